"""parallax_kernels: the Parallax attention family, layout (batch, seq, heads, head_dim).

Per op: a pure-PyTorch reference, Triton kernels, and one public function that dispatches
(Triton on CUDA, the Triton interpreter when TRITON_INTERPRET=1, the reference elsewhere).
"""

from ._alloc import poison_outputs
from ._checks import AttnShape, check_attn_inputs
from ._dispatch import backend_for
from .linear import affine_linear_attn_reference, linear_attn_reference
from .lla import lla_attn_reference
from .parallax import (
    parallax_attn,
    parallax_attn_reference,
    parallax_decode,
    parallax_decode_reference,
    parallax_weights,
)
from .softmax import softmax_attn, softmax_attn_reference, softmax_decode

__all__ = [
    "AttnShape",
    "affine_linear_attn_reference",
    "backend_for",
    "check_attn_inputs",
    "linear_attn_reference",
    "lla_attn_reference",
    "parallax_attn",
    "parallax_attn_reference",
    "parallax_decode",
    "parallax_decode_reference",
    "parallax_weights",
    "poison_outputs",
    "softmax_attn",
    "softmax_attn_reference",
    "softmax_decode",
]
