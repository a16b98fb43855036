"""nn.LayerNorm, and SS2D's gate norm(y) * silu(z), as autograd ops over the Triton kernels
(ops/layernorm/kernels.py); PyTorch's operations where the kernels do not run.

Under CUDA autocast PyTorch runs layer_norm in float32, copying every half-precision input to float32 first; the
kernels read the input as it is, compute in float32 and write the output once in the dtype asked for. The gate
keeps only y, z and two float32 values per row for its backward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nnunetv2_sa_umamba.ops.common import KERNEL_DTYPES, fused_kernels_run, lazy_module

# a tile holds whole rows in registers
MAX_CHANNELS = 8192
_kernels = lazy_module("nnunetv2_sa_umamba.ops.layernorm.kernels")


def _norm_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype nn.LayerNorm returns for ``x``: CUDA autocast lists layer_norm among its float32 ops (it leaves
    float64 alone); CPU autocast leaves it alone (x's dtype, as without autocast)."""
    if x.device.type == "cuda" and torch.is_autocast_enabled("cuda") and x.dtype != torch.float64:
        return torch.float32
    return x.dtype


def _storage_elements(t: torch.Tensor) -> int:
    """Elements of t's storage: a bound on every offset the kernels compute from t's data pointer."""
    return t.untyped_storage().nbytes() // t.element_size()


def _fused(x: torch.Tensor, norm: nn.LayerNorm, out_dtype: torch.dtype, largest_tensor_elements: int,
           kernels: str) -> bool:
    """Whether the kernels run ``norm`` on ``x`` (..., C); PyTorch's operations otherwise."""
    affine_over_last_dim = (len(norm.normalized_shape) == 1 and norm.weight is not None and norm.bias is not None
                            and norm.weight.dtype in KERNEL_DTYPES and norm.bias.dtype in KERNEL_DTYPES)
    # a mismatched C falls back, where F.layer_norm names the expected shape
    return (affine_over_last_dim and x.shape[-1] == norm.normalized_shape[0] and 0 < x.shape[-1] <= MAX_CHANNELS
            and x.numel() > 0
            and out_dtype in KERNEL_DTYPES
            and fused_kernels_run(kernels, x, largest_tensor_elements, f"LayerNorm with kernels {kernels!r}"))


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` (..., C) as (rows, C) with a contiguous last dimension: a view where t's leading dimensions collapse to
    one row stride (a chunk of a wider channel-last tensor does), a copy otherwise."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(1) == 1 else rows.contiguous()


class _LayerNorm(torch.autograd.Function):
    """(..., C) -> (..., C) in ``out_dtype``; parameters (C,)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, out_dtype: torch.dtype):
        x_rows = _rows(x)
        out, mean, rstd = _kernels().forward(x_rows, None, weight, bias, eps, out_dtype)
        ctx.save_for_backward(x_rows, weight, bias, mean, rstd)
        ctx.shape = x.shape
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, grad_out):
        x_rows, weight, bias, mean, rstd = ctx.saved_tensors
        grad_x, _, grad_weight, grad_bias = _kernels().backward(_rows(grad_out), x_rows, None, weight, bias, mean,
                                                                rstd)
        return grad_x.view(ctx.shape), grad_weight.to(weight.dtype), grad_bias.to(bias.dtype), None, None


class _LayerNormGate(torch.autograd.Function):
    """y, z (..., C) -> LayerNorm(y) * silu(z) (..., C) in ``out_dtype``; parameters (C,)."""

    @staticmethod
    def forward(ctx, y, z, weight, bias, eps: float, out_dtype: torch.dtype):
        y_rows, z_rows = _rows(y), _rows(z)
        out, mean, rstd = _kernels().forward(y_rows, z_rows, weight, bias, eps, out_dtype)
        ctx.save_for_backward(y_rows, z_rows, weight, bias, mean, rstd)
        ctx.shape = y.shape
        return out.view(y.shape)

    @staticmethod
    def backward(ctx, grad_out):
        y_rows, z_rows, weight, bias, mean, rstd = ctx.saved_tensors
        grad_y, grad_z, grad_weight, grad_bias = _kernels().backward(_rows(grad_out), y_rows, z_rows, weight, bias,
                                                                     mean, rstd)
        return (grad_y.view(ctx.shape), grad_z.view(ctx.shape), grad_weight.to(weight.dtype),
                grad_bias.to(bias.dtype), None, None)


def _torch_layer_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    # nn.LayerNorm.forward, not norm(x): a subclass may route its forward here
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


@torch.compiler.disable
def layer_norm(x: torch.Tensor, norm: nn.LayerNorm, out_dtype: torch.dtype | None = None,
               kernels: str = "auto") -> torch.Tensor:
    """``norm(x)`` for x (..., C): same values as nn.LayerNorm under the current autocast state and, by default,
    its dtype (float32 under CUDA autocast). ``out_dtype`` rounds the float32 result once, e.g. to the autocast
    dtype where a matmul follows. ``kernels``: "auto", "triton" or "torch" (``KernelPolicy.layernorm``)."""
    out_dtype = out_dtype or _norm_dtype(x)
    if not _fused(x, norm, out_dtype, max(x.numel(), _storage_elements(x)), kernels):
        return _torch_layer_norm(x, norm).to(out_dtype)
    return _LayerNorm.apply(x, norm.weight, norm.bias, norm.eps, out_dtype)


@torch.compiler.disable
def layer_norm_gate(y: torch.Tensor, z: torch.Tensor, norm: nn.LayerNorm, out_dtype: torch.dtype | None = None,
                    kernels: str = "auto") -> torch.Tensor:
    """``norm(y) * F.silu(z)`` for y, z (..., C) of one shape: same values as that expression under the current
    autocast state and, by default, its dtype (float32 under CUDA autocast). z may be a view whose leading
    dimensions have one row stride, such as a chunk of a wider channel-last tensor; it is read in place.
    ``kernels`` as for ``layer_norm``."""
    out_dtype = out_dtype or torch.promote_types(_norm_dtype(y), z.dtype)
    largest = max(y.numel(), _storage_elements(y), _storage_elements(z))
    if (y.shape != z.shape or y.device != z.device or z.dtype not in KERNEL_DTYPES
            or not _fused(y, norm, out_dtype, largest, kernels)):
        return (_torch_layer_norm(y, norm) * F.silu(z)).to(out_dtype)
    return _LayerNormGate.apply(y, z, norm.weight, norm.bias, norm.eps, out_dtype)
