from .reference import lla_attn_reference

__all__ = ["lla_attn_reference"]
