"""A tensor that autograd would keep from the forward for the backward, rebuilt in the backward instead.

SS2D's four-direction copy of its input (cross-scan: B x 4D x L) is the largest tensor its backward reads (the
scan's u and the x_proj matmul's input): 4x the size of the activation it is copied from. Rebuilding it from that
activation when the backward first asks for it costs one copy kernel per SS2D; with SS2D's gated output (the out
projection's input) rebuilt from the gate's inputs the same way, a training step's peak memory at batch
28 x 3 x 256 x 256 drops by 1.1-1.4 GiB for about 1 % more time (docs/BENCHMARKS.md). Built on
torch.autograd.graph.saved_tensors_hooks, so it holds for every op that saves the tensor or a view of it, ours and
PyTorch's.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import Tensor


class _Rebuilt:
    """Stands in for ``tensor`` in the saved tensors; ``get`` rebuilds it, once for every view saved of it."""

    def __init__(self, tensor: Tensor, rebuild: Callable[[], Tensor]):
        self.rebuild = rebuild
        self.shape, self.stride, self.dtype = tensor.shape, tensor.stride(), tensor.dtype
        # the backward runs without the forward's autocast: the rebuild gets it back, to compute the same values
        self.device_type = tensor.device.type
        self.autocast = torch.is_autocast_enabled(self.device_type), torch.get_autocast_dtype(self.device_type)
        self.pending = 0  # views packed and not unpacked yet: the rebuilt tensor is kept until the last one
        self.cached: Tensor | None = None

    def get(self) -> Tensor:
        if torch.is_grad_enabled():  # the backward runs with grad only under create_graph=True
            raise RuntimeError("a tensor rebuilt in the backward (ops/recompute.py) has no graph of its own, so "
                               "gradients of gradients (backward with create_graph=True) cannot pass through it; "
                               "run the module under the reference implementation for that")
        if self.cached is None:
            enabled, dtype = self.autocast
            with torch.no_grad(), torch.autocast(self.device_type, dtype=dtype, enabled=enabled):
                rebuilt = self.rebuild()
            if rebuilt.shape != self.shape or rebuilt.stride() != self.stride or rebuilt.dtype != self.dtype:
                raise RuntimeError(f"the rebuilt tensor is {tuple(rebuilt.shape)} {rebuilt.dtype} with strides "
                                   f"{rebuilt.stride()}; the forward's was {tuple(self.shape)} {self.dtype} with "
                                   f"strides {self.stride}")
            self.cached = rebuilt
        rebuilt = self.cached
        self.pending -= 1
        if self.pending <= 0:  # (a backward with retain_graph=True unpacks again: it rebuilds again)
            self.cached = None
        return rebuilt


@contextmanager
def rebuilt_in_backward(tensor: Tensor, rebuild: Callable[[], Tensor]) -> Iterator[None]:
    """While the block runs, ops that save ``tensor`` or a view of it for their backward keep ``rebuild`` instead,
    which the backward calls (without grad, under the autocast state of the block's start) to make the same values
    again with the same shape, strides and dtype.
    ``rebuild`` must only read tensors that autograd keeps anyway, or it keeps them alive itself. ``tensor`` must stay
    referenced until the block ends: its storage is what identifies it and its views."""
    if not tensor.requires_grad or torch.compiler.is_compiling():  # (Inductor plans its own recomputation)
        yield
        return
    stand_in = _Rebuilt(tensor, rebuild)
    # autograd keeps the hooks with what they packed, so they must not refer to the tensor itself
    device, storage, offset = tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset()

    def pack(saved: Tensor):
        if saved.device != device or saved.untyped_storage().data_ptr() != storage:
            return saved
        stand_in.pending += 1
        return stand_in, saved.shape, saved.stride(), saved.storage_offset() - offset

    def unpack(packed):
        if isinstance(packed, Tensor):
            return packed
        _, shape, stride, view_offset = packed
        rebuilt = stand_in.get()
        return rebuilt.as_strided(shape, stride, rebuilt.storage_offset() + view_offset)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
