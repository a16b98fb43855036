"""SS2D's cross-scan and cross-merge."""
from nnunetv2_sa_umamba.ops.cross_scan.interface import NUM_DIRECTIONS, cross_merge, cross_scan, use_fused

__all__ = ["NUM_DIRECTIONS", "cross_merge", "cross_scan", "use_fused"]
