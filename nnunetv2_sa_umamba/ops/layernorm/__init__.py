"""LayerNorm over the last dimension, and SS2D's gate LayerNorm(y) * silu(z)."""
from nnunetv2_sa_umamba.ops.layernorm.interface import layer_norm, layer_norm_gate

__all__ = ["layer_norm", "layer_norm_gate"]
