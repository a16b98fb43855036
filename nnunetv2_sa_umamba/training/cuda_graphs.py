"""A network's training forward and backward replayed as CUDA graphs.

The fast path launches about 2000 small kernels per training step; on an H100 the GPU waits for Python between
many of them (docs/BENCHMARKS.md). PyTorch's ``make_graphed_callables`` records the forward and the backward once
and then replays each with one launch: the same kernels on the same tensors, so the same values. Random draws
(drop path) come from the same generator, advanced on every replay.

Only calls that look like the recorded one replay the graphs: training mode, gradients on, a CUDA input of the
recorded shape and dtype, the same autocast setting, the same trainable parameters where they were, and no
gradient left from before (nnU-Net zeroes with set_to_none=True). Any other call (validation, prediction, another
patch size, gradient accumulation over steps) runs the ordinary forward. As with any CUDA graph, a replay writes its outputs
into the same tensors every step: copy an output that must outlive the next training step.
"""
from __future__ import annotations

import gc
import inspect
import warnings

import torch
from torch import nn

WARMUP_STEPS = 3  # eager forward + backward passes before recording (cuDNN autotuning, Triton compilation)


def _call_signature(network: nn.Module, x: torch.Tensor) -> tuple | None:
    """What a recording depends on, or None where this call must run the ordinary forward."""
    if not (network.training and torch.is_grad_enabled() and x.is_cuda) or torch.jit.is_tracing() \
            or torch.compiler.is_compiling():
        return None
    autocast = torch.is_autocast_enabled("cuda")
    parameters = list(network.parameters())
    if any(p.grad is not None for p in parameters if p.requires_grad):
        # a replay hands autograd its static gradient buffers, which then become .grad and are overwritten by the
        # next replay: accumulating over steps, or zeroing in place, would count gradients twice (PyTorch issue
        # 181723). nnU-Net zeroes with set_to_none=True, so its steps replay.
        return None
    return (tuple(x.shape), x.dtype, x.device, x.requires_grad, autocast,
            torch.get_autocast_dtype("cuda") if autocast else None, torch.are_deterministic_algorithms_enabled(),
            getattr(network, "deep_supervision", None),
            # the graphs read the parameters where they were when recorded (.to(), .half(), assign=True loads
            # move them)
            tuple((p.requires_grad, p.data_ptr()) for p in parameters))


def _capture_mode() -> dict:
    """thread_local where torch offers the choice (2.13+): then CUDA calls of other threads, such as nnU-Net's
    pin-memory thread, may go on during the recording instead of invalidating it."""
    if "capture_error_mode" in inspect.signature(torch.cuda.make_graphed_callables).parameters:
        return {"capture_error_mode": "thread_local"}
    return {}


class _TrainingGraphs:
    """Replaces ``network.forward``; records on the first training call and replays on matching ones."""

    def __init__(self, network: nn.Module):
        self.network = network
        self.eager_forward = network.forward
        self.signature = None
        self.graphed_forward = None
        self.failed = False

    def __reduce__(self):
        # a deep copy (or an unpickled copy) of the network gets its own wrapper, unrecorded: the graphs belong to
        # the original's tensors
        return _TrainingGraphs, (self.network,)

    def __call__(self, x: torch.Tensor, *args, **kwargs):
        signature = None if args or kwargs or self.failed else _call_signature(self.network, x)
        if signature is not None and self.graphed_forward is None:
            self._record(x, signature)
        if signature is None or signature != self.signature:  # also after a failed recording
            return self.eager_forward(x, *args, **kwargs)
        return self.graphed_forward(x)

    def _record(self, x: torch.Tensor, signature: tuple) -> None:
        network = self.network
        # the warm-up passes must not move batch-norm running statistics
        buffers = [(buffer, buffer.clone()) for buffer in network.buffers()]
        autocast_forward = _AutocastForward(network, self.eager_forward, torch.is_autocast_enabled("cuda"),
                                            torch.get_autocast_dtype("cuda"))
        try:
            # autocast covers the forward only (inside the module): the backward is recorded outside it, as eager
            # training runs it (under autocast the backward's ops would cast again: an fp16 step ran 7 ms slower)
            with torch.autocast("cuda", enabled=False):
                self.graphed_forward = torch.cuda.make_graphed_callables(
                    autocast_forward, (x.detach().clone().requires_grad_(x.requires_grad),),
                    num_warmup_iters=WARMUP_STEPS, allow_unused_input=True, **_capture_mode()).forward
            self.signature = signature
            torch.cuda.empty_cache()  # the warm-up passes' blocks, cached on their side stream
        except Exception as error:  # noqa: BLE001 - any failure to record leaves eager training, which works
            self.failed = True
            warnings.warn(f"Recording the training step as CUDA graphs failed ({error}); training continues "
                          f"without them.", RuntimeWarning, stacklevel=3)
        finally:
            with torch.no_grad():
                for buffer, saved in buffers:
                    buffer.copy_(saved)


class _AutocastForward(nn.Module):
    """The network's ordinary forward under the autocast setting of the recorded call. make_graphed_callables
    records this module; its parameters are the network's."""

    def __init__(self, network: nn.Module, eager_forward, autocast: bool, autocast_dtype: torch.dtype):
        super().__init__()
        self.network = network
        self.eager_forward = eager_forward
        self.autocast = autocast
        self.autocast_dtype = autocast_dtype

    def forward(self, x: torch.Tensor):
        # make_graphed_callables refuses autocast's weight cache: its cast copies would outlive the recording
        with torch.autocast("cuda", dtype=self.autocast_dtype, enabled=self.autocast, cache_enabled=False):
            return self.eager_forward(x)


def enable_training_graphs(network: nn.Module) -> nn.Module:
    """Make ``network``'s training steps replay as CUDA graphs from its first training call on (see the module
    docstring for when). Returns ``network``, whose parameters, buffers and state dict are unchanged. Not for
    DDP-wrapped or torch.compile'd networks: pass the plain module before wrapping."""
    if _graphs(network) is not None:
        return network
    if network._forward_hooks or network._forward_pre_hooks or network._backward_hooks:
        raise ValueError("make_graphed_callables needs a network without module hooks; enable the graphs first, "
                         "then register hooks")
    network.forward = _TrainingGraphs(network)
    return network


def disable_training_graphs(network: nn.Module) -> None:
    """Back to the ordinary forward; frees the graphs and the memory they keep reserved (e.g. before the final
    validation)."""
    graphs = _graphs(network)
    if graphs is None:
        return
    del network.forward
    graphs.network = graphs.eager_forward = graphs.graphed_forward = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _graphs(network: nn.Module) -> _TrainingGraphs | None:
    graphs = network.__dict__.get("forward")
    return graphs if isinstance(graphs, _TrainingGraphs) else None


def graphs_enabled(network: nn.Module) -> bool:
    return _graphs(network) is not None


def graphs_recorded(network: nn.Module) -> bool:
    graphs = _graphs(network)
    return graphs is not None and graphs.graphed_forward is not None
