"""RFAConv's chain up to its last BatchNorm as one fused op."""
from nnunetv2_sa_umamba.ops.rfaconv.interface import rfaconv_chain, use_fused

__all__ = ["rfaconv_chain", "use_fused"]
