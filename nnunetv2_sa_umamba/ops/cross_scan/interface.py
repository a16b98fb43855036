"""SS2D's cross-scan and cross-merge: PyTorch copies, or one Triton kernel each (ops/cross_scan/kernels.py).

cross-scan:  x (B, H, W, D) -> xs (B, 4, D, L), L = H*W, directions: row-major, column-major, reversed row-major,
             reversed column-major.
cross-merge: ys (B, 4, D, L) -> y (B, H, W, D), the sum of the four directions back in row-major order.
Each is the other's adjoint, so the fused ops' backwards are each other.
"""
from __future__ import annotations

import torch
from torch import Tensor

from nnunetv2_sa_umamba.ops.common import fused_kernels_run, lazy_module

NUM_DIRECTIONS = 4
_kernels = lazy_module("nnunetv2_sa_umamba.ops.cross_scan.kernels")


def use_fused(x: Tensor, choice: str) -> bool:
    """Whether the kernels scan and merge for SS2D input ``x`` (B, H, W, D) (or any layout of its elements), for
    the kernel choice ("auto", "triton" or "torch", ``KernelPolicy.cross_scan``)."""
    return fused_kernels_run(choice, x, NUM_DIRECTIONS * x.numel(), f"cross-scan with kernels {choice!r}")


def _cross_scan_torch(x: Tensor) -> Tensor:
    """(B, D, H, W) -> (B, 4, D, H*W), into one preallocated buffer."""
    b, d, h, w = x.shape
    xs = x.new_empty(b, NUM_DIRECTIONS, d, h * w)
    xs[:, 0].view(b, d, h, w).copy_(x)
    xs[:, 1].view(b, d, w, h).copy_(x.transpose(2, 3))
    xs[:, 2:] = xs[:, :2].flip(-1)
    return xs


def _cross_merge_torch(ys: Tensor, h: int, w: int) -> Tensor:
    """(B, 4, D, H*W) -> (B, D, H*W) in row-major order."""
    b, _, d, length = ys.shape
    forward_and_reversed = ys[:, :2] + ys[:, 2:].flip(-1)
    column_major = forward_and_reversed[:, 1].view(b, d, w, h).transpose(2, 3).reshape(b, d, length)
    return forward_and_reversed[:, 0] + column_major


class _CrossScanFused(torch.autograd.Function):
    """(B, H, W, D) -> (B, 4, D, H*W) in ``dtype``; the backward is the cross-merge of the gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, dtype: torch.dtype) -> Tensor:
        ctx.x_dtype, ctx.hw = x.dtype, x.shape[1:3]
        return _kernels().cross_scan(x.contiguous(), dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _kernels().cross_merge(grad.contiguous(), *ctx.hw, ctx.x_dtype), None


class _CrossMergeFused(torch.autograd.Function):
    """(B, 4, D, H*W) -> (B, H, W, D); the backward is the cross-scan of the gradient."""

    @staticmethod
    def forward(ctx, ys: Tensor, h: int, w: int) -> Tensor:
        ctx.ys_dtype = ys.dtype
        return _kernels().cross_merge(ys.contiguous(), h, w, ys.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _kernels().cross_scan(grad.contiguous(), ctx.ys_dtype), None, None


@torch.compiler.disable
def _cross_scan_fused(x: Tensor, dtype: torch.dtype) -> Tensor:
    return _CrossScanFused.apply(x, dtype)


@torch.compiler.disable
def _cross_merge_fused(ys: Tensor, h: int, w: int) -> Tensor:
    return _CrossMergeFused.apply(ys, h, w)


def cross_scan(x: Tensor, dtype: torch.dtype, fused: bool) -> Tensor:
    """x (B, H, W, D) -> xs (B, 4, D, H*W) in ``dtype``; ``fused``: the Triton kernel (see ``use_fused``)."""
    if fused:
        return _cross_scan_fused(x, dtype)
    return _cross_scan_torch(x.permute(0, 3, 1, 2).to(dtype))


def cross_merge(ys: Tensor, h: int, w: int, fused: bool) -> Tensor:
    """ys (B, 4, D, H*W) -> y (B, H, W, D) in ys's dtype; ``fused``: the Triton kernel (see ``use_fused``)."""
    if fused:
        return _cross_merge_fused(ys, h, w)
    b, _, d, _ = ys.shape
    return _cross_merge_torch(ys, h, w).view(b, d, h, w).permute(0, 2, 3, 1)
