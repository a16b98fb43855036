"""A tensor that autograd would keep from the forward for the backward, rebuilt in the backward instead.

SS2D's four-direction copy of its input (cross-scan: B x 4D x L) is the largest tensor its backward reads (the
scan's u and the x_proj matmul's input): 4x the size of the activation it is copied from. Rebuilding it from that
activation when the backward first asks for it costs one copy kernel per SS2D; SS2D's gated output (the out
projection's input) is rebuilt from the gate's inputs the same way. What that saves and costs: docs/BENCHMARKS.md.
Built on torch.autograd.graph.saved_tensors_hooks, so it holds for every op that saves the tensor or a view of it,
ours and PyTorch's.
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import Tensor


def _outer_hooks_active() -> bool:
    """Whether saved-tensor hooks are already set (a user's non-reentrant checkpoint, save_on_cpu): ours would
    replace them inside the block, so everything else saved there would be kept. (torch.utils.checkpoint asks
    autograd the same way; there is no public call. Where torch lacks it, outer hooks lose their effect inside the
    block, which costs memory, never correctness.)"""
    try:
        return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
    except (AttributeError, TypeError):
        return False


def _whole_storage(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a plain tensor that is its storage, all of it: then a saved tensor on that storage is
    ``tensor`` or a view of it, and nothing else."""
    return (type(tensor) is Tensor and tensor.is_contiguous() and tensor.storage_offset() == 0
            and tensor.numel() * tensor.element_size() == tensor.untyped_storage().nbytes())


class _Rebuilt:
    """Stands in for ``tensor`` in the saved tensors; ``get`` rebuilds it once per backward for every view saved."""

    def __init__(self, tensor: Tensor, rebuild: Callable[[], Tensor]):
        self.rebuild = rebuild
        self.shape, self.stride, self.dtype = tensor.shape, tensor.stride(), tensor.dtype
        # to refuse a tensor changed in place after it was saved, as autograd does for the tensors it keeps
        self.tensor, self.version = weakref.ref(tensor), tensor._version
        # the backward runs without the forward's autocast: the rebuild gets it back, to compute the same values
        self.device_type = tensor.device.type
        self.autocast = torch.is_autocast_enabled(self.device_type), torch.get_autocast_dtype(self.device_type)
        self.packed = 0  # views saved
        self.pending = 0  # views not unpacked yet in this backward: the rebuilt tensor is kept until the last one
        self.cached: Tensor | None = None

    def pack(self) -> None:
        self.packed += 1
        self.pending += 1

    def get(self) -> Tensor:
        if torch.is_grad_enabled():  # the backward runs with grad only under create_graph=True
            raise RuntimeError("a tensor rebuilt in the backward (ops/recompute.py) has no graph of its own: "
                               "gradients of gradients (backward with create_graph=True) cannot pass through it, "
                               "nor can it be read from grad_fn's saved tensors with grad enabled")
        tensor = self.tensor()
        if tensor is not None and tensor._version != self.version:
            raise RuntimeError("a tensor that the backward rebuilds (ops/recompute.py) was modified by an inplace "
                               "operation after the forward used it")
        if self.cached is None:
            enabled, dtype = self.autocast
            with torch.no_grad(), torch.autocast(self.device_type, dtype=dtype, enabled=enabled,
                                                 cache_enabled=False):
                rebuilt = self.rebuild()
            if (rebuilt.shape != self.shape or rebuilt.stride() != self.stride or rebuilt.dtype != self.dtype
                    or not _whole_storage(rebuilt)):
                raise RuntimeError(f"the rebuilt tensor is {tuple(rebuilt.shape)} {rebuilt.dtype} with strides "
                                   f"{rebuilt.stride()} (owning its whole storage: {_whole_storage(rebuilt)}); the "
                                   f"forward's was {tuple(self.shape)} {self.dtype} with strides {self.stride}")
            self.cached = rebuilt
        rebuilt = self.cached
        self.pending -= 1
        if self.pending == 0:
            # freed after the last view; a second backward (retain_graph=True) rebuilds once more
            self.cached, self.pending = None, self.packed
        return rebuilt


@contextmanager
def rebuilt_in_backward(tensor: Tensor, rebuild: Callable[[], Tensor]) -> Iterator[None]:
    """While the block runs, ops that save ``tensor`` or a view of it for their backward keep ``rebuild`` instead,
    which the backward calls (without grad, under the autocast state ``tensor`` was made under) to make the same
    values again with the same shape, strides and dtype.

    ``rebuild`` must only read tensors that autograd keeps anyway, or it keeps them alive itself. ``tensor`` must be
    a plain contiguous tensor that owns its whole storage (how it and its views are recognised) and stay referenced
    until the block ends; for any other tensor, under outer saved-tensor hooks, without grad and while compiling
    (Inductor plans its own recomputation), the block runs as it is and autograd keeps what it saves. A backward that
    runs only some of the saving ops (autograd.grad for some inputs) keeps the rebuilt tensor until the graph goes.
    """
    if (not tensor.requires_grad or torch.compiler.is_compiling() or not _whole_storage(tensor)
            or _outer_hooks_active()):
        yield
        return
    stand_in = _Rebuilt(tensor, rebuild)
    # autograd keeps the hooks with what they packed, so they must not refer to the tensor itself
    device, storage, dtype = tensor.device, tensor.untyped_storage().data_ptr(), tensor.dtype

    def pack(saved: Tensor):
        """(saved tensor, its version, None) for a tensor kept; (None, None, view geometry) for tensor's views."""
        if (type(saved) is not Tensor or saved.device != device or saved.dtype != dtype
                or saved.untyped_storage().data_ptr() != storage):
            return saved, saved._version, None
        stand_in.pack()
        return None, None, (saved.shape, saved.stride(), saved.storage_offset())

    def unpack(packed):
        saved, version, view = packed
        if view is not None:
            return stand_in.get().as_strided(*view)
        # autograd checks this itself only for the tensors it packs
        if saved._version != version:
            raise RuntimeError(f"a tensor saved for the backward ({tuple(saved.shape)} {saved.dtype}) was modified "
                               f"by an inplace operation: its version is {saved._version}, {version} when it was "
                               f"saved")
        return saved

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
