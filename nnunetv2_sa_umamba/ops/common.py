"""What the operators share: the kernels' dtypes and size limit, optional imports, Triton's availability and
interpreter, and the conventions of our registered custom ops."""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from types import ModuleType
from typing import Callable

import torch
from torch import Tensor

# every kernel (Triton and mamba-ssm's) accumulates in float32; float64 keeps PyTorch's operations
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# the Triton kernels index tensors with 32-bit offsets
MAX_ELEMENTS = 2 ** 31 - 1
# RFAConv's receptive field: 3 x 3 positions, each with its own feature and attention weight
RFACONV_POSITIONS = 9
TRITON_INSTALL_HINT = "pip install triton"


@functools.cache
def triton_importable() -> bool:
    """Whether Triton is installed; does not import it (Triton's interpreter must be chosen before that)."""
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    """Whether Triton's interpreter is on (``TRITON_INTERPRET=1``, Triton's own switch): kernels then run on CPU
    tensors, slowly; the tests use it."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def optional_import(name: str) -> tuple[ModuleType | None, str]:
    """(module, "") if the optional module ``name`` imports, else (None, why it did not); tried once."""
    try:
        return importlib.import_module(name), ""
    except (ImportError, OSError) as err:  # OSError: a compiled extension missing a CUDA runtime library
        return None, f"{type(err).__name__}: {err}"


def lazy_module(name: str) -> Callable[[], ModuleType]:
    """A function that imports module ``name`` at its first call and returns it: modules of Triton kernels import
    Triton, an optional dependency, so they load only when a kernel runs."""
    return functools.cache(lambda: importlib.import_module(name))


def fused_kernels_run(choice: str, x: Tensor, largest_tensor_elements: int, what: str) -> bool:
    """Whether an operator's Triton kernels run on ``x`` for its kernel choice (a ``KernelPolicy`` field: "auto",
    "triton" or "torch"), the op's largest tensor having ``largest_tensor_elements`` elements. "auto": on CUDA
    tensors when Triton is installed. "triton": wherever the kernels can take ``x``, else an error naming ``what``.
    The operator's own conditions (deterministic mode, ...) come on top, in its module."""
    if choice == "torch" or largest_tensor_elements > MAX_ELEMENTS or x.dtype not in KERNEL_DTYPES:
        return False
    if choice == "auto":
        return x.is_cuda and triton_importable()
    if not triton_importable():
        raise RuntimeError(f"{what} asks for the Triton kernels but Triton is not installed; {TRITON_INSTALL_HINT}, "
                           f"or choose 'auto' or 'torch'.")
    if not (x.is_cuda or triton_interpreted()):
        raise RuntimeError(f"{what} needs CUDA tensors for the Triton kernels (or TRITON_INTERPRET=1 to run them on "
                           f"the CPU, slowly); got a {x.device.type} tensor.")
    return True


def matmul_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype autocast runs a matmul on ``x`` in; None without autocast. The fused ops compute and round in
    it where autocast would."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None


def optional_output(t: Tensor | None, like: Tensor) -> Tensor:
    """``t``, or an empty tensor for None: a custom op cannot return None."""
    return like.new_empty(0) if t is None else t


def optional_grad(grad: Tensor, given: Tensor | None) -> Tensor | None:
    """The gradient for an optional input of a custom op: None where the input was None."""
    return None if given is None else grad
