from .decode import parallax_decode
from .op import parallax_attn
from .reference import parallax_attn_reference, parallax_decode_reference, parallax_weights

__all__ = [
    "parallax_attn",
    "parallax_attn_reference",
    "parallax_decode",
    "parallax_decode_reference",
    "parallax_weights",
]
