from .op import softmax_attn, softmax_decode
from .reference import softmax_attn_reference

__all__ = ["softmax_attn", "softmax_attn_reference", "softmax_decode"]
