"""The selective scan: one function, four backends (``cuda``, ``triton``, ``torch``, ``reference``)."""
from nnunetv2_sa_umamba.ops.scan.interface import (
    available_backends,
    resolve_backend,
    selective_scan,
    selective_scan_lowrank_delta,
)

__all__ = ["available_backends", "resolve_backend", "selective_scan", "selective_scan_lowrank_delta"]
