"""Whether the fused Triton kernels (RFAConv chain, SS2D cross-scan/merge) run, for one environment variable.

``SAUMAMBA_FUSED_KERNELS``:
- ``auto`` (default): the Triton kernels for CUDA tensors when Triton imports, PyTorch operations otherwise;
- ``triton``: always the kernels (also on CPU tensors under ``TRITON_INTERPRET=1``, which the tests use);
- ``torch``: never the kernels.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

ENV_VAR = "SAUMAMBA_FUSED_KERNELS"
CHOICES = ("auto", "triton", "torch")
# the kernels index tensors with 32-bit offsets
MAX_ELEMENTS = 2 ** 31 - 1
# they accumulate in float32, so float64 keeps PyTorch's operations
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    """Whether Triton's interpreter is on (kernels then run on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(x: torch.Tensor, largest_tensor_elements: int) -> bool:
    """Whether the fused kernels run on ``x``, whose largest tensor in the op has that many elements."""
    choice = os.environ.get(ENV_VAR, "").strip().lower() or "auto"
    if choice not in CHOICES:
        raise ValueError(f"environment variable {ENV_VAR}={os.environ[ENV_VAR]!r} is not one of "
                         f"{', '.join(CHOICES)}; set one of those or unset it.")
    if choice == "torch" or largest_tensor_elements > MAX_ELEMENTS or x.dtype not in KERNEL_DTYPES:
        return False
    if choice == "auto":
        return x.is_cuda and triton_importable()
    if not triton_importable():
        raise RuntimeError(f"{ENV_VAR}=triton but Triton is not installed; pip install triton, or unset {ENV_VAR}.")
    if not (x.is_cuda or triton_interpreted()):
        raise RuntimeError(f"{ENV_VAR}=triton needs CUDA tensors (or TRITON_INTERPRET=1 to run the kernels on "
                           f"the CPU, slowly); got a {x.device.type} tensor.")
    return True


def matmul_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast runs a matmul on ``x`` in; None without autocast. The fused ops compute and round in
    it where autocast would."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None
