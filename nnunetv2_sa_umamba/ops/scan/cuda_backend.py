"""The ``cuda`` selective-scan backend: mamba-ssm's compiled kernel as a registered torch op.

The kernel is the top-level extension module ``selective_scan_cuda`` built by mamba-ssm
(``pip install -e ".[cuda]"``, with ``MAMBA_FORCE_BUILD=TRUE`` and a CUDA toolkit). It is imported
lazily and on its own: importing the ``mamba_ssm`` package would pull heavy optional dependencies.

Registering forward and backward with ``torch.library.custom_op`` (fake kernels for shapes and an
autograd formula) lets torch.compile keep the scan inside one graph instead of breaking at the
pybind call. Kernel facts (mamba-ssm 2.3.2, csrc/selective_scan/selective_scan.cpp):
``fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus) -> [out, x]`` and
``bwd(u, delta, A, B, C, D, z, delta_bias, dout, x, out, dz, delta_softplus, recompute_out_z)
-> [du, ddelta, dA, dB, dC, dD, ddelta_bias]``. u, delta, B, C (and dout) share one dtype out of
float32/float16/bfloat16 and need last-dim stride 1; A, D, delta_bias are float32; ``out`` and all
input gradients come back in the input dtype; ``x`` holds the float32 state at the end of every
2048-step chunk, (batch, dim, n_chunks, 2 N), and is what the backward needs.
"""
from types import ModuleType

import torch
from torch import Tensor

from nnunetv2_sa_umamba.ops.common import (
    KERNEL_DTYPES,
    lazy_module,
    optional_grad,
    optional_import,
    optional_output,
)

KERNEL_MODULE = "selective_scan_cuda"  # the compiled extension, imported after torch
_KERNEL_CHUNK = 2048  # steps per chunk inside the kernel; sizes the saved states x


def kernel_available() -> bool:
    """Whether mamba-ssm's ``selective_scan_cuda`` extension can be imported."""
    return optional_import(KERNEL_MODULE)[0] is not None


def kernel_import_error() -> str:
    """Why ``selective_scan_cuda`` did not import ("" when it did)."""
    return optional_import(KERNEL_MODULE)[1]


_sequential_forward = lazy_module("nnunetv2_sa_umamba.ops.scan.sequential_forward")
_sequential_backward = lazy_module("nnunetv2_sa_umamba.ops.scan.sequential_backward")


def _kernel() -> ModuleType:
    module, error = optional_import(KERNEL_MODULE)
    if module is None:
        raise RuntimeError(f"mamba-ssm's selective_scan_cuda kernel is not importable ({error}).")
    return module


def _last_dim_contiguous(t: Tensor | None) -> Tensor | None:
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


@torch.library.custom_op("saumamba::scan_cuda_fwd", mutates_args=(), device_types="cuda")
def _scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
              delta_bias: Tensor | None, delta_softplus: bool) -> tuple[Tensor, Tensor]:
    """out (batch, dim, L) in u's dtype and the kernel's saved states x (float32)."""
    u, delta, B, C, D, delta_bias = (_last_dim_contiguous(t) for t in (u, delta, B, C, D, delta_bias))
    out, x = _kernel().fwd(u, delta, A, B, C, D, None, delta_bias, delta_softplus)
    return out, x


def _fake_states(u: Tensor, A: Tensor) -> Tensor:
    """The saved states x the kernel returns for u (batch, dim, L): float32, (batch, dim, n_chunks, 2 N)."""
    b, d, length = u.shape
    n_chunks = (length + _KERNEL_CHUNK - 1) // _KERNEL_CHUNK
    return u.new_empty((b, d, n_chunks, 2 * A.shape[1]), dtype=torch.float32)


@_scan_fwd.register_fake
def _(u, delta, A, B, C, D, delta_bias, delta_softplus):
    # the kernel allocates out with empty_like(delta)
    return torch.empty_like(_last_dim_contiguous(delta)), _fake_states(u, A)


@torch.library.custom_op("saumamba::scan_cuda_bwd", mutates_args=(), device_types="cuda")
def _scan_bwd(dout: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
              D: Tensor | None, delta_bias: Tensor | None, x: Tensor,
              delta_softplus: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(du, ddelta, dA, dB, dC, dD, ddelta_bias); dD, ddelta_bias are empty when D, delta_bias are None."""
    dout, u, delta, B, C, D, delta_bias = (
        _last_dim_contiguous(t) for t in (dout, u, delta, B, C, D, delta_bias))
    du, ddelta, dA, dB, dC, dD, ddelta_bias = _kernel().bwd(
        u, delta, A, B, C, D, None, delta_bias, dout, x, None, None, delta_softplus, False)
    return du, ddelta, dA, dB, dC, optional_output(dD, A), optional_output(ddelta_bias, A)


@_scan_bwd.register_fake
def _(dout, u, delta, A, B, C, D, delta_bias, x, delta_softplus):
    u, delta, B, C, D, delta_bias = (_last_dim_contiguous(t) for t in (u, delta, B, C, D, delta_bias))
    return (torch.empty_like(u), torch.empty_like(delta), torch.empty_like(A), torch.empty_like(B),
            torch.empty_like(C), A.new_empty(0) if D is None else torch.empty_like(D),
            A.new_empty(0) if delta_bias is None else torch.empty_like(delta_bias))


@torch.library.custom_op("saumamba::scan_sequential_bwd", mutates_args=(), device_types="cuda")
def _scan_sequential_bwd(dout: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                         D: Tensor | None, delta_bias: Tensor | None,
                         delta_softplus: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """scan_cuda_bwd's gradients from ops/scan/sequential_backward.py's kernel, which needs no saved states. An op,
    so that torch.compile and fake-tensor tracing see shapes instead of launching the Triton kernel."""
    du, ddelta, dA, dB, dC, dD, ddelta_bias = _sequential_backward().backward(
        dout, u, delta, A, B, C, D, delta_bias, delta_softplus)
    return du, ddelta, dA, dB, dC, optional_output(dD, A), optional_output(ddelta_bias, A)


@_scan_sequential_bwd.register_fake
def _(dout, u, delta, A, B, C, D, delta_bias, delta_softplus):
    # the kernel's outputs are contiguous whatever the inputs' strides
    return (*(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (u, delta, A, B, C)),
            A.new_empty(0) if D is None else torch.empty_like(D),
            A.new_empty(0) if delta_bias is None else torch.empty_like(delta_bias))


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, delta_bias, delta_softplus = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, delta_bias, output[1])
    ctx.delta_softplus = delta_softplus


def _backward(ctx, dout, _dx):
    u, delta, A, B, C, D, delta_bias, x = ctx.saved_tensors
    du, ddelta, dA, dB, dC, dD, ddelta_bias = torch.ops.saumamba.scan_cuda_bwd(
        dout, u, delta, A, B, C, D, delta_bias, x, ctx.delta_softplus)
    return du, ddelta, dA, dB, dC, optional_grad(dD, D), optional_grad(ddelta_bias, delta_bias), None


_scan_fwd.register_autograd(_backward, setup_context=_setup_context)


def project_delta(delta_weight: Tensor, delta_low: Tensor) -> Tensor:
    """delta (batch, groups * dim_per_group, L) = delta_weight (groups, dim_per_group, R) @ delta_low (batch, groups,
    R, L), per group."""
    b, _, _, length = delta_low.shape
    with torch.autocast(delta_low.device.type, enabled=False):  # in the inputs' dtype, also inside custom ops
        return torch.matmul(delta_weight, delta_low).view(b, -1, length)


@torch.library.custom_op("saumamba::scan_cuda_lowrank_delta_fwd", mutates_args=(), device_types="cuda")
def _scan_lowrank_delta_fwd(u: Tensor, delta_low: Tensor, delta_weight: Tensor, A: Tensor, B: Tensor, C: Tensor,
                            D: Tensor | None, delta_bias: Tensor | None, delta_softplus: bool,
                            sequential_forward: bool, sequential_backward: bool) -> tuple[Tensor, Tensor]:
    """As scan_cuda_fwd with delta = project_delta(delta_weight, delta_low); with ``sequential_forward`` the
    Triton kernel of ops/scan/sequential_forward.py computes (out, x) instead of mamba-ssm's forward; with
    ``sequential_backward`` the backward is ops/scan/sequential_backward.py's, which reads no x."""
    delta = project_delta(delta_weight, delta_low)
    if sequential_forward:
        return _sequential_forward().forward(u, delta, A, B, C, D, delta_bias, delta_softplus)
    return torch.ops.saumamba.scan_cuda_fwd(u, delta, A, B, C, D, delta_bias, delta_softplus)


@_scan_lowrank_delta_fwd.register_fake
def _(u, delta_low, delta_weight, A, B, C, D, delta_bias, delta_softplus, sequential_forward, sequential_backward):
    return (u.new_empty(u.shape, dtype=torch.promote_types(delta_weight.dtype, delta_low.dtype)),
            _fake_states(u, A))


def _lowrank_setup_context(ctx, inputs, output):
    u, delta_low, delta_weight, A, B, C, D, delta_bias, delta_softplus, _, sequential_backward = inputs
    # the low-rank factor, not delta: R rows per group instead of dim_per_group
    ctx.save_for_backward(u, delta_low, delta_weight, A, B, C, D, delta_bias, output[1])
    ctx.delta_softplus = delta_softplus
    ctx.sequential_backward = sequential_backward


def _lowrank_backward(ctx, dout, _dx):
    u, delta_low, delta_weight, A, B, C, D, delta_bias, x = ctx.saved_tensors
    delta = project_delta(delta_weight, delta_low)
    if ctx.sequential_backward:
        du, ddelta, dA, dB, dC, dD, ddelta_bias = torch.ops.saumamba.scan_sequential_bwd(
            dout, u, delta, A, B, C, D, delta_bias, ctx.delta_softplus)
    else:
        du, ddelta, dA, dB, dC, dD, ddelta_bias = torch.ops.saumamba.scan_cuda_bwd(
            dout, u, delta, A, B, C, D, delta_bias, x, ctx.delta_softplus)
    ddelta = ddelta.view(delta_low.shape[0], delta_weight.shape[0], delta_weight.shape[1], -1)
    # the matmul's gradients, as autograd forms them (the weight's summed over the batch)
    grad_low = torch.matmul(delta_weight.transpose(-1, -2), ddelta)
    grad_weight = torch.matmul(ddelta, delta_low.transpose(-1, -2)).sum(0)
    return (du, grad_low, grad_weight, dA, dB, dC, optional_grad(dD, D), optional_grad(ddelta_bias, delta_bias),
            None, None, None)


_scan_lowrank_delta_fwd.register_autograd(_lowrank_backward, setup_context=_lowrank_setup_context)


def _kernel_operands(u: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                     delta_bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """A, B, C, D, delta_bias as the kernel takes them beside u: B and C in u's dtype, the rest float32."""
    if u.dtype not in KERNEL_DTYPES:
        raise TypeError(f"the cuda selective-scan kernel takes float32/float16/bfloat16 inputs, got "
                        f"{u.dtype}; use backend='torch' for other dtypes.")
    f32 = torch.float32
    return (A.to(f32), B.to(u.dtype), C.to(u.dtype), None if D is None else D.to(f32),
            None if delta_bias is None else delta_bias.to(f32))


def selective_scan_cuda(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                        D: Tensor | None = None, delta_bias: Tensor | None = None,
                        delta_softplus: bool = False) -> Tensor:
    """The kernel's scan; y (batch, dim, L) in u's dtype (one of ``KERNEL_DTYPES``).

    delta, B, C are cast to u's dtype and A, D, delta_bias to float32, as the kernel requires.
    """
    operands = _kernel_operands(u, A, B, C, D, delta_bias)
    out, _ = torch.ops.saumamba.scan_cuda_fwd(u, delta.to(u.dtype), *operands, delta_softplus)
    return out


def selective_scan_cuda_lowrank_delta(u: Tensor, delta_low: Tensor, delta_weight: Tensor, A: Tensor, B: Tensor,
                                      C: Tensor, D: Tensor | None = None, delta_bias: Tensor | None = None,
                                      delta_softplus: bool = False, sequential_forward: bool = False,
                                      sequential_backward: bool = False) -> Tensor:
    """``selective_scan_cuda`` with delta = project_delta(delta_weight, delta_low), computed here. The backward
    recomputes delta instead of keeping it: for SS2D it keeps R = ceil(C / 16) rows per direction instead of 2C,
    which lowers peak training memory (docs/BENCHMARKS.md). delta_weight and delta_low must have u's dtype.
    ``sequential_forward``: the forward is our step-by-step Triton kernel (``use_sequential_forward``);
    ``sequential_backward``: the backward is (``use_sequential_backward``); otherwise mamba-ssm's."""
    operands = _kernel_operands(u, A, B, C, D, delta_bias)
    if delta_low.dtype != u.dtype or delta_weight.dtype != u.dtype:
        raise TypeError(f"the cuda selective-scan kernel takes u, delta_low and delta_weight of one dtype, got "
                        f"{u.dtype}, {delta_low.dtype}, {delta_weight.dtype}")
    out, _ = torch.ops.saumamba.scan_cuda_lowrank_delta_fwd(u, delta_low, delta_weight, *operands, delta_softplus,
                                                            sequential_forward, sequential_backward)
    return out
