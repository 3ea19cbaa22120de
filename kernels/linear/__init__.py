from .reference import affine_linear_attn_reference, linear_attn_reference

__all__ = ["affine_linear_attn_reference", "linear_attn_reference"]
