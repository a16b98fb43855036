"""The ``triton`` selective-scan backend: our Triton kernels (ops/scan/kernels.py) as registered torch ops."""
from __future__ import annotations

import torch

from nnunetv2_sa_umamba.ops.common import KERNEL_DTYPES, optional_grad, optional_output
from nnunetv2_sa_umamba.ops.scan.kernels import backward, forward


# Registered ops (fake kernels for shapes, an autograd formula), as ops/scan/cuda_backend.py does for mamba-ssm's
# kernel, so that torch.compile keeps the scan in its graph. No device restriction: Triton's interpreter runs them
# on CPU.
@torch.library.custom_op("saumamba::scan_triton_fwd", mutates_args=())
def _scan_fwd(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
              D: torch.Tensor | None, delta_bias: torch.Tensor | None, delta_softplus: bool) -> torch.Tensor:
    return forward(u, delta, A, B, C, D, delta_bias, delta_softplus)


@_scan_fwd.register_fake
def _(u, delta, A, B, C, D, delta_bias, delta_softplus):
    return torch.empty_like(u)


@torch.library.custom_op("saumamba::scan_triton_bwd", mutates_args=())
def _scan_bwd(dout: torch.Tensor, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
              C: torch.Tensor, D: torch.Tensor | None, delta_bias: torch.Tensor | None,
              delta_softplus: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                             torch.Tensor, torch.Tensor]:
    du, ddelta, dA, dB, dC, dD, ddelta_bias = backward(dout.contiguous(), u, delta, A, B, C, D, delta_bias,
                                                       delta_softplus)
    return du, ddelta, dA, dB, dC, optional_output(dD, A), optional_output(ddelta_bias, A)


@_scan_bwd.register_fake
def _(dout, u, delta, A, B, C, D, delta_bias, delta_softplus):
    return (torch.empty_like(u), torch.empty_like(delta), torch.empty_like(A), torch.empty_like(B),
            torch.empty_like(C), A.new_empty(0) if D is None else torch.empty_like(D),
            A.new_empty(0) if delta_bias is None else torch.empty_like(delta_bias))


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, delta_bias, delta_softplus = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, delta_bias)
    ctx.delta_softplus = delta_softplus


def _backward(ctx, dout):
    u, delta, A, B, C, D, delta_bias = ctx.saved_tensors
    du, ddelta, dA, dB, dC, dD, ddelta_bias = torch.ops.saumamba.scan_triton_bwd(
        dout, u, delta, A, B, C, D, delta_bias, ctx.delta_softplus)
    return du, ddelta, dA, dB, dC, optional_grad(dD, D), optional_grad(ddelta_bias, delta_bias), None


_scan_fwd.register_autograd(_backward, setup_context=_setup_context)


def selective_scan_triton(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                          C: torch.Tensor, D: torch.Tensor | None = None, delta_bias: torch.Tensor | None = None,
                          delta_softplus: bool = False) -> torch.Tensor:
    """The Triton kernels' scan; y (batch, dim, L) in u's dtype (one of ``KERNEL_DTYPES``).

    u, delta, B and C may have different dtypes (each is read as float32); A, D, delta_bias become float32.
    """
    if u.dtype not in KERNEL_DTYPES:
        raise TypeError(f"the triton selective-scan kernels take float32/float16/bfloat16 inputs, got {u.dtype}; "
                        f"use backend='torch' for other dtypes.")
    f32 = torch.float32
    return torch.ops.saumamba.scan_triton_fwd(
        u.contiguous(), delta.contiguous(), A.to(f32).contiguous(), B.contiguous(), C.contiguous(),
        None if D is None else D.to(f32).contiguous(),
        None if delta_bias is None else delta_bias.to(f32).contiguous(), delta_softplus)
