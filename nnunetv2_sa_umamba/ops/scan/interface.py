"""The selective scan behind one function, with the backend chosen once and logged once.

Backends (same semantics, mamba-ssm's ``selective_scan_fn`` without ``z``):
- ``cuda``: mamba-ssm's compiled kernel (``selective_scan_cuda``) as a registered torch op.
- ``triton``: our Triton kernels (ops/scan/kernels.py), forward and backward; needs Triton and CUDA tensors
  (or ``TRITON_INTERPRET=1``, which runs them on the CPU, slowly: the tests use it).
- ``torch``: chunked pure PyTorch with a hand-written backward; any device, float32 state.
- ``reference``: the step-by-step loop under autograd; for tests, used only when named explicitly.

``selective_scan_lowrank_delta`` with the ``cuda`` backend can run its forward as our step-by-step Triton kernel
(ops/scan/sequential_forward.py) beside mamba-ssm's backward: ``use_sequential_forward`` decides, from the kernel
policy's ``scan_forward``; and its backward as our step-by-step Triton backward (ops/scan/sequential_backward.py):
``use_sequential_backward`` decides, from ``scan_backward``.

Choice: the ``backend`` argument (SS2D passes its ``KernelPolicy``'s ``scan``, which ``SAUMAMBA_SCAN_BACKEND``
sets), ``auto`` by default: for CUDA tensors mamba-ssm's kernel when it imports, else the Triton kernels when
Triton imports; ``torch`` otherwise. Under torch.compile the choice is made once, when the graph is traced.
"""
import functools
import logging
import math

import torch
from torch import Tensor

from nnunetv2_sa_umamba.ops.common import (
    TRITON_INSTALL_HINT,
    fused_kernels_run,
    lazy_module,
    triton_importable,
    triton_interpreted,
)
from nnunetv2_sa_umamba.ops.policy import SCAN_BACKENDS, SCAN_ENV_VAR
from nnunetv2_sa_umamba.ops.scan import cuda_backend
from nnunetv2_sa_umamba.ops.scan.reference import selective_scan_reference
from nnunetv2_sa_umamba.ops.scan.torch_backend import selective_scan_torch

logger = logging.getLogger("nnunetv2_sa_umamba")

BACKENDS = ("cuda", "triton", "torch", "reference")
COMPUTE_DTYPES = (None, torch.float32, torch.bfloat16)
INSTALL_HINT = ('install mamba-ssm with its CUDA kernel (torch with CUDA and a CUDA toolkit with nvcc '
                'needed): MAMBA_FORCE_BUILD=TRUE pip install -e ".[cuda]"')
_DESCRIPTIONS = {
    "cuda": "mamba-ssm's selective_scan_cuda kernel",
    "triton": "Triton kernels (ops/scan/kernels.py)",
    "torch": "chunked pure PyTorch",
    "reference": "sequential reference loop (slow; meant for tests)",
}
_logged: set[str] = set()
_triton_backend = lazy_module("nnunetv2_sa_umamba.ops.scan.triton_backend")
_sequential_forward = lazy_module("nnunetv2_sa_umamba.ops.scan.sequential_forward")
_sequential_backward = lazy_module("nnunetv2_sa_umamba.ops.scan.sequential_backward")
# "auto" runs the sequential forward where its programs (each one walk through the whole sequence) are at least
# this many per SM: on an H200 it beat mamba-ssm's forward in every measured scan of SS2D's with that many (batch
# 3-28, 64-4096 steps) and lost in every one with fewer (batch 1-12, 64-16384 steps; docs/BENCHMARKS.md)
SEQUENTIAL_FORWARD_MIN_PROGRAMS_PER_SM = 8
# ... and only for sequences of at least this many steps: shorter scans (a 64 x 64 demo's deepest stages) would save
# microseconds per step, and compiling the kernel adds about 3 s to a fresh machine's first iteration
SEQUENTIAL_FORWARD_MIN_LENGTH = 64
# "auto" runs the sequential backward for scans of SEQUENTIAL_FORWARD_MIN_LENGTH to this many steps, with as many
# programs per SM as the forward needs: at batch 28 on an H200 it took half of mamba-ssm's backward's time at 64 steps
# and 9 % more at 256 (docs/BENCHMARKS.md); 128 lies between, unmeasured
SEQUENTIAL_BACKWARD_MAX_LENGTH = 128


def available_backends() -> tuple[str, ...]:
    """Backends that can run on this machine: ``cuda`` needs a GPU and the importable kernel, ``triton`` a GPU
    (or Triton's interpreter) and Triton."""
    usable = {"cuda": torch.cuda.is_available() and cuda_backend.kernel_available(),
              "triton": (torch.cuda.is_available() or triton_interpreted()) and triton_importable()}
    return tuple(name for name in BACKENDS if usable.get(name, True))


def resolve_backend(device: torch.device | str, backend: str = "auto") -> str:
    """Name of the backend that scans tensors on ``device``: "cuda", "triton", "torch" or "reference".

    ``backend``: "auto", "cuda", "triton", "torch" or "reference". Raises ValueError for unknown names and
    RuntimeError when "cuda" or "triton" cannot run.
    """
    if backend not in SCAN_BACKENDS:
        raise ValueError(f"unknown selective-scan backend {backend!r}; choose one of {', '.join(SCAN_BACKENDS)}.")
    device = torch.device(device)
    if backend == "auto":
        if device.type != "cuda":
            return "torch"
        if cuda_backend.kernel_available():
            return "cuda"
        # without mamba-ssm the Triton kernels are far faster than the chunked PyTorch scan (docs/BENCHMARKS.md)
        return "triton" if triton_importable() else "torch"
    if backend == "triton":
        problems = []
        if not triton_importable():
            problems.append(f"Triton is not installed ({TRITON_INSTALL_HINT})")
        if device.type != "cuda" and not triton_interpreted():
            problems.append(f"the tensors are on {device}, not on a CUDA device (TRITON_INTERPRET=1 runs the "
                            f"kernels on the CPU, slowly)")
        if problems:
            raise RuntimeError(f"selective-scan backend 'triton' cannot run: {'; '.join(problems)}. "
                               f"Use backend 'torch' or 'auto' (or {SCAN_ENV_VAR}=torch) otherwise.")
    if backend == "cuda":
        problems = []
        if device.type != "cuda":
            problems.append(f"the tensors are on {device}, not on a CUDA device")
        if not cuda_backend.kernel_available():
            problems.append(f"mamba-ssm's selective_scan_cuda does not import "
                            f"({cuda_backend.kernel_import_error()})")
        if problems:
            raise RuntimeError(f"selective-scan backend 'cuda' cannot run: {'; '.join(problems)}. "
                               f"To use it, {INSTALL_HINT} and pass CUDA tensors; otherwise use "
                               f"backend 'torch' or 'auto' (or {SCAN_ENV_VAR}=torch).")
    return backend


@torch.compiler.assume_constant_result
def _choose_backend(device: torch.device, backend: str) -> str:
    """resolve_backend plus the one-time log line; a constant for torch.compile."""
    name = resolve_backend(device, backend)
    if name not in _logged:
        _logged.add(name)
        logger.info("selective scan backend: %s (%s)", name, _DESCRIPTIONS[name])
    return name


def _check_shapes(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                  delta_bias: Tensor | None) -> None:
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must be (batch, dim, L), got shape {tuple(u.shape)}")
    b, d, length = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"selective_scan: delta must have u's shape {tuple(u.shape)}, "
                         f"got {tuple(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != d:
        raise ValueError(f"selective_scan: A must be (dim={d}, N), got shape {tuple(A.shape)}")
    n = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if t.dim() != 4 or (t.shape[0], t.shape[2], t.shape[3]) != (b, n, length):
            raise ValueError(f"selective_scan: {name} must be (batch={b}, groups, N={n}, L={length}), "
                             f"got shape {tuple(t.shape)} (for one group use {name}.unsqueeze(1))")
    groups = B.shape[1]
    if C.shape[1] != groups or d % groups:
        raise ValueError(f"selective_scan: B and C need the same number of groups dividing dim={d}, "
                         f"got {groups} and {C.shape[1]}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and tuple(t.shape) != (d,):
            raise ValueError(f"selective_scan: {name} must be (dim={d},), got shape {tuple(t.shape)}")


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                   delta_bias: Tensor | None = None, delta_softplus: bool = False,
                   backend: str = "auto", compute_dtype: torch.dtype | None = None) -> Tensor:
    """Selective scan y (batch, dim, L), with mamba-ssm's ``selective_scan_fn`` semantics.

    u, delta: (batch, dim, L). A: (dim, N), float32. B, C: (batch, groups, N, L); channel d reads
    group d // (dim // groups). D, delta_bias: (dim,), float32, optional. Per channel:
    delta = softplus(delta + delta_bias) if ``delta_softplus``; h_0 = 0;
    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t;  y_t = <h_t, C_t> + D * u_t.
    The state and all sums are float32 whatever the input dtype (float64 inputs: float64).

    ``compute_dtype``: None keeps the inputs as given; torch.float32 or torch.bfloat16 casts u,
    delta, B and C to it first. The output has u's dtype after that cast, as the kernel returns.
    Under float16 autocast pass torch.bfloat16 (half the traffic, float32's range) or torch.float32:
    the kernel's float16 output overflows, as scan outputs reach about 1e6.
    ``backend``: see the module docstring and ``resolve_backend``.
    """
    _check_shapes(u, delta, A, B, C, D, delta_bias)
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"selective_scan: compute_dtype must be None, torch.float32 or "
                         f"torch.bfloat16, got {compute_dtype}")
    name = _choose_backend(u.device, backend)
    if compute_dtype is not None:
        u, delta, B, C = (t.to(compute_dtype) for t in (u, delta, B, C))
    if name == "triton":
        return _triton_backend().selective_scan_triton(u, delta, A, B, C, D, delta_bias, delta_softplus)
    impl = {"cuda": cuda_backend.selective_scan_cuda, "torch": selective_scan_torch,
            "reference": selective_scan_reference}[name]
    return impl(u, delta, A, B, C, D, delta_bias, delta_softplus)


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _use_sequential(direction: str, u: Tensor, d_state: int, groups: int, choice: str, max_length: float,
                    kernel_module) -> bool:
    """Whether the sequential Triton kernel runs the scan's ``direction`` ("forward" or "backward"; its module
    ``kernel_module``): "auto" for SEQUENTIAL_FORWARD_MIN_LENGTH to ``max_length`` steps and at least
    SEQUENTIAL_FORWARD_MIN_PROGRAMS_PER_SM programs per SM, "triton" always, "torch" never."""
    if not fused_kernels_run(choice, u, u.numel(), f"the sequential scan {direction} with kernels {choice!r}"):
        return False
    if not _sequential_forward().supports(d_state):
        if choice == "triton":
            raise ValueError(f"the sequential scan {direction} needs a power-of-two state size in [2, 64], got "
                             f"{d_state}; choose scan_{direction} 'auto' or 'torch'.")
        return False
    if choice == "triton":
        return True
    if not SEQUENTIAL_FORWARD_MIN_LENGTH <= u.shape[-1] <= max_length:
        return False
    programs = kernel_module().program_count(u.shape[0], u.shape[1], groups)
    return programs >= SEQUENTIAL_FORWARD_MIN_PROGRAMS_PER_SM * _multiprocessors(u.device)


def use_sequential_forward(u: Tensor, d_state: int, groups: int, choice: str) -> bool:
    """Whether the ``cuda`` backend's scan of ``u`` (batch, dim, L) with state size ``d_state`` and ``groups`` groups
    of B and C runs its forward as the sequential Triton kernel, for the kernel choice ("auto", "triton" or "torch",
    ``KernelPolicy.scan_forward``): "auto" where it has ``SEQUENTIAL_FORWARD_MIN_PROGRAMS_PER_SM`` programs per SM
    and ``SEQUENTIAL_FORWARD_MIN_LENGTH`` steps, "triton" always."""
    return _use_sequential("forward", u, d_state, groups, choice, math.inf, _sequential_forward)


def use_sequential_backward(u: Tensor, d_state: int, groups: int, choice: str) -> bool:
    """Whether the ``cuda`` backend's scan of ``u`` (batch, dim, L) runs its backward as the sequential Triton
    kernel instead of mamba-ssm's, for the kernel choice ("auto", "triton" or "torch", ``KernelPolicy.scan_backward``):
    "auto" for SEQUENTIAL_FORWARD_MIN_LENGTH to SEQUENTIAL_BACKWARD_MAX_LENGTH steps with
    SEQUENTIAL_FORWARD_MIN_PROGRAMS_PER_SM programs per SM, "triton" always."""
    return _use_sequential("backward", u, d_state, groups, choice, SEQUENTIAL_BACKWARD_MAX_LENGTH,
                           _sequential_backward)


def selective_scan_lowrank_delta(u: Tensor, delta_low: Tensor, delta_weight: Tensor, A: Tensor, B: Tensor,
                                 C: Tensor, D: Tensor | None = None, delta_bias: Tensor | None = None,
                                 delta_softplus: bool = False, backend: str = "auto",
                                 scan_forward: str = "auto", scan_backward: str = "auto") -> Tensor:
    """``selective_scan`` with delta = delta_weight (groups, dim / groups, R) @ delta_low (batch, groups, R, L)
    per group (SS2D's dt projection). Same values; with the ``cuda`` backend the backward recomputes delta from
    delta_low instead of keeping it, the forward is the sequential Triton kernel where
    ``use_sequential_forward(u, N, groups, scan_forward)`` and the backward where
    ``use_sequential_backward(u, N, groups, scan_backward)``. u, delta_low and delta_weight share one dtype."""
    groups = delta_low.shape[1] if delta_low.dim() == 4 else -1
    if delta_low.dim() != 4 or delta_low.shape[0] != u.shape[0] or delta_low.shape[3] != u.shape[2] \
            or delta_weight.dim() != 3 or delta_weight.shape[0] != groups \
            or delta_weight.shape[2] != delta_low.shape[2] or groups * delta_weight.shape[1] != u.shape[1]:
        raise ValueError(f"selective_scan_lowrank_delta: for u {tuple(u.shape)}, delta_low must be (batch, groups, "
                         f"R, L) and delta_weight (groups, dim / groups, R) with groups * dim / groups = "
                         f"{u.shape[1]}; got {tuple(delta_low.shape)} and {tuple(delta_weight.shape)}")
    name = _choose_backend(u.device, backend)
    if name == "cuda":
        _check_shapes(u, u, A, B, C, D, delta_bias)
        return cuda_backend.selective_scan_cuda_lowrank_delta(
            u, delta_low, delta_weight, A, B, C, D, delta_bias, delta_softplus,
            sequential_forward=use_sequential_forward(u, A.shape[1], B.shape[1], scan_forward),
            sequential_backward=use_sequential_backward(u, A.shape[1], B.shape[1], scan_backward))
    return selective_scan(u, cuda_backend.project_delta(delta_weight, delta_low), A, B, C, D, delta_bias,
                          delta_softplus, backend=name)
