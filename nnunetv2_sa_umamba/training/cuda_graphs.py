"""A network's training step and its inference forward replayed as CUDA graphs.

The fast path launches about 2000 small kernels per training step; on an H100 the GPU waits for Python between
many of them (docs/BENCHMARKS.md). A CUDA graph records the kernels once and then replays them with one launch:
the same kernels on the same tensors, so the same values. Random draws (drop path) come from the same generator,
advanced on every replay.

Training graphs (``enable_training_graphs``): PyTorch's ``make_graphed_callables`` records the forward and the
backward. Only calls that look like the recorded one replay them: training mode, gradients on, a CUDA input of the
recorded shape and dtype, the same autocast setting, the same trainable parameters where they were, and no
gradient left from before (nnU-Net zeroes with set_to_none=True). Any other call (another patch size, gradient
accumulation over steps) runs the ordinary forward. As with any CUDA graph, a replay writes its outputs into the
same tensors every step: copy an output that must outlive the next training step.

Inference graphs (``enable_inference_graphs``): eval-mode calls without gradients (nnU-Net's sliding-window
prediction, one tile shape) are recorded per input shape, dtype and autocast setting, up to
``MAX_INFERENCE_GRAPHS`` at a time (the least recently used is dropped), and replayed; each call returns a copy of
the outputs, so callers may keep them.

Both only for inputs on the current CUDA device (streams and graphs belong to it), and never while tracing or
compiling. A graph keeps the kernels chosen when it was recorded: settings read during the forward (TF32, the
scan backend's environment variables) apply to graphs recorded after they change. A failed recording warns and
leaves the ordinary forward, which always works.
"""
from __future__ import annotations

import functools
import gc
import inspect
import warnings
import weakref
from contextlib import contextmanager

import torch
from torch import nn

WARMUP_STEPS = 3  # eager passes before recording (cuDNN autotuning, Triton compilation)
MAX_INFERENCE_GRAPHS = 4  # input shapes kept recorded at once


def _common_signature(network: nn.Module, x: torch.Tensor) -> tuple:
    autocast = torch.is_autocast_enabled("cuda")
    return (tuple(x.shape), x.dtype, x.device, autocast, torch.get_autocast_dtype("cuda") if autocast else None,
            torch.are_deterministic_algorithms_enabled(), getattr(network, "deep_supervision", None),
            # a graph reads the tensors where they were when recorded (.to(), .half(), assign=True loads move them)
            tuple((buffer.data_ptr(), buffer.dtype) for buffer in network.buffers()))


def _graphable(x: torch.Tensor) -> bool:
    # on another device than the current one the recording would capture nothing (its streams are the current
    # device's) and every replay would return the first call's outputs
    return (x.is_cuda and x.device.index == torch.cuda.current_device()
            and not (torch.jit.is_tracing() or torch.compiler.is_compiling()))


def _training_signature(network: nn.Module, x: torch.Tensor) -> tuple | None:
    """What a training recording depends on, or None where this call must run the ordinary forward."""
    if not (network.training and torch.is_grad_enabled() and _graphable(x)):
        return None
    parameters = list(network.parameters())
    if any(p.grad is not None for p in parameters if p.requires_grad):
        # a replay hands autograd its static gradient buffers, which then become .grad and are overwritten by the
        # next replay: accumulating over steps, or zeroing in place, would count gradients twice (PyTorch issue
        # 181723). nnU-Net zeroes with set_to_none=True, so its steps replay.
        return None
    return (_common_signature(network, x), x.requires_grad,
            tuple((p.requires_grad, p.data_ptr(), p.dtype) for p in parameters))


def _inference_signature(network: nn.Module, x: torch.Tensor) -> tuple | None:
    """Eval mode without gradients only: training mode would update batch-norm statistics and draw drop paths."""
    if network.training or torch.is_grad_enabled() or not _graphable(x):
        return None
    # inference mode: the recorded input is an inference tensor, which only inference mode may copy into
    return (_common_signature(network, x), torch.is_inference_mode_enabled(),
            tuple((p.data_ptr(), p.dtype) for p in network.parameters()))


# thread_local: CUDA calls of other threads, such as nnU-Net's pin-memory thread, may go on during a recording
# instead of invalidating it. torch.cuda.graph takes it in every torch we support, make_graphed_callables from 2.13.
CAPTURE_ERROR_MODE = "thread_local"


def _make_graphed_callables_capture_mode() -> dict:
    if "capture_error_mode" in inspect.signature(torch.cuda.make_graphed_callables).parameters:
        return {"capture_error_mode": CAPTURE_ERROR_MODE}
    return {}


@contextmanager
def _restoring_stream_on_failure():
    """A recording that fails at its end can leave the recording's side stream current: the ordinary forward that
    follows would then race with the work queued on the caller's stream."""
    stream = torch.cuda.current_stream()
    try:
        yield
    except Exception:
        torch.cuda.set_stream(stream)
        torch.cuda.synchronize()
        raise


def _clone_outputs(outputs):
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(output.clone() for output in outputs)
    return outputs.clone()


def _autocast_setting() -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")


def _autocast_without_cache(setting: tuple[bool, torch.dtype] | None = None):
    """The caller's (or ``setting``'s) autocast without its weight cache: cast copies cached during a recording
    would be freed when the caller's autocast block ends, while the graph still reads them."""
    enabled, dtype = setting or _autocast_setting()
    return torch.autocast("cuda", dtype=dtype, enabled=enabled, cache_enabled=False)


@functools.cache
def _warmup_stream(device_index: int) -> torch.cuda.Stream:
    """One side stream per device for the warm-up passes: torch keeps a cuBLAS workspace (32 MiB on an H100) for
    every stream that ran a matmul, so a new stream per recording would leave one behind each time."""
    return torch.cuda.Stream(device_index)


class _InferenceGraph:
    def __init__(self, forward, x: torch.Tensor):
        self.static_input = x.detach().clone()
        side_stream = _warmup_stream(x.device.index)
        side_stream.wait_stream(torch.cuda.current_stream())
        with _autocast_without_cache():
            with torch.cuda.stream(side_stream):
                for _ in range(WARMUP_STEPS):
                    forward(self.static_input)
            torch.cuda.current_stream().wait_stream(side_stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, capture_error_mode=CAPTURE_ERROR_MODE):
                self.static_outputs = forward(self.static_input)

    def __call__(self, x: torch.Tensor):
        self.static_input.copy_(x)
        self.graph.replay()
        return _clone_outputs(self.static_outputs)


class _GraphedForward:
    """Replaces ``network.forward``; records on the first matching call and replays on later ones.

    Holds its network weakly, so that a network without recorded training graphs is freed (with its inference
    graphs' memory) as soon as it is dropped, not at the next garbage collection."""

    def __init__(self, network: nn.Module):
        self.network_ref = weakref.ref(network)
        # a forward set on the instance before ours (rare) is kept; otherwise the class's forward is called
        self.instance_forward = network.__dict__.get("forward")
        self.training = False
        self.inference = False
        self.training_signature = None
        self.training_forward = None
        self.training_failed = False
        self.inference_graphs: dict[tuple, _InferenceGraph] = {}
        self.inference_failed_signatures: set[tuple] = set()

    @property
    def network(self) -> nn.Module:
        return self.network_ref()

    def eager_forward(self, *args, **kwargs):
        if self.instance_forward is not None:
            return self.instance_forward(*args, **kwargs)
        network = self.network
        return type(network).forward(network, *args, **kwargs)

    def __reduce__(self):
        # a deep copy (or an unpickled copy) of the network gets its own wrapper, unrecorded: the graphs belong to
        # the original's tensors
        return _copied_wrapper, (self.network, self.training, self.inference)

    def __call__(self, x: torch.Tensor, *args, **kwargs):
        if not (args or kwargs):
            if self.training and not self.training_failed:
                signature = _training_signature(self.network, x)
                if signature is not None:
                    if self.training_forward is None:
                        self._record_training(x, signature)
                    if signature == self.training_signature:
                        return self.training_forward(x)
            if self.inference:
                signature = _inference_signature(self.network, x)
                if signature is not None and signature not in self.inference_failed_signatures:
                    graph = self._inference_graph(x, signature)
                    if graph is not None:
                        return graph(x)
        return self.eager_forward(x, *args, **kwargs)

    def _record_training(self, x: torch.Tensor, signature: tuple) -> None:
        network = self.network
        # the warm-up passes must not move batch-norm running statistics
        buffers = [(buffer, buffer.clone()) for buffer in network.buffers()]
        autocast_forward = _AutocastForward(network, self.eager_forward)
        try:
            # autocast covers the forward only (inside the module): the backward is recorded outside it, as eager
            # training runs it (under autocast the backward's ops would cast again: an fp16 step ran 7 ms slower)
            with torch.autocast("cuda", enabled=False), _restoring_stream_on_failure():
                self.training_forward = torch.cuda.make_graphed_callables(
                    autocast_forward, (x.detach().clone().requires_grad_(x.requires_grad),),
                    num_warmup_iters=WARMUP_STEPS, allow_unused_input=True,
                    **_make_graphed_callables_capture_mode()).forward
            self.training_signature = signature
            torch.cuda.empty_cache()  # the warm-up passes' blocks, cached on their side stream
        except Exception as error:  # noqa: BLE001 - any failure to record leaves eager training, which works
            # a training step that failed to record would fail again at every step
            self.training_failed = True
            _warn_failed("training step", error, "training runs without graphs from now on")
        finally:
            with torch.no_grad():
                for buffer, saved in buffers:
                    buffer.copy_(saved)

    def _inference_graph(self, x: torch.Tensor, signature: tuple) -> _InferenceGraph | None:
        graph = self.inference_graphs.pop(signature, None)
        if graph is None:
            try:
                with _restoring_stream_on_failure():
                    graph = _InferenceGraph(self.eager_forward, x)
            except Exception as error:  # noqa: BLE001 - as for training: the ordinary forward works
                self.inference_failed_signatures.add(signature)
                _warn_failed("inference forward", error, "inputs of this shape run without graphs from now on")
                return None
            if len(self.inference_graphs) >= MAX_INFERENCE_GRAPHS:
                del self.inference_graphs[next(iter(self.inference_graphs))]  # the least recently used
            torch.cuda.empty_cache()  # the warm-up passes' blocks and a dropped graph's pool
        self.inference_graphs[signature] = graph  # (re)inserted last: the most recently used
        return graph

    def release(self, training: bool) -> bool:
        """Drops one kind of graphs; whether any were recorded."""
        if training:
            recorded = self.training_forward is not None
            self.training = False
            self.training_signature = self.training_forward = None
        else:
            recorded = bool(self.inference_graphs)
            self.inference = False
            self.inference_graphs.clear()
        return recorded


def _warn_failed(what: str, error: Exception, consequence: str) -> None:
    # stacklevel: this, _record/_inference_graph, __call__, Module._call_impl, Module._wrapped_call_impl, caller
    warnings.warn(f"Recording the {what} as a CUDA graph failed ({error}); {consequence}.", RuntimeWarning,
                  stacklevel=6)


class _AutocastForward(nn.Module):
    """The network's ordinary forward under the autocast setting of the recorded call; make_graphed_callables
    records this module, whose parameters are the network's."""

    def __init__(self, network: nn.Module, eager_forward):
        super().__init__()
        self.network = network
        self.eager_forward = eager_forward
        self.autocast_setting = _autocast_setting()

    def forward(self, x: torch.Tensor):
        # make_graphed_callables also refuses autocast's weight cache
        with _autocast_without_cache(self.autocast_setting):
            return self.eager_forward(x)


def _copied_wrapper(network: nn.Module, training: bool, inference: bool) -> _GraphedForward:
    wrapper = _GraphedForward(network)
    wrapper.training, wrapper.inference = training, inference
    return wrapper


def _graphs(network: nn.Module) -> _GraphedForward | None:
    graphs = network.__dict__.get("forward")
    return graphs if isinstance(graphs, _GraphedForward) else None


def _install(network: nn.Module) -> _GraphedForward:
    graphs = _graphs(network)
    if graphs is None:
        if network._forward_hooks or network._forward_pre_hooks or network._backward_hooks:
            raise ValueError("CUDA graphs need a network without module hooks; enable the graphs first, then register "
                             "hooks")
        graphs = network.forward = _GraphedForward(network)
    return graphs


def _release(network: nn.Module, training: bool) -> None:
    graphs = _graphs(network)
    if graphs is None:
        return
    recorded = graphs.release(training)
    if not (graphs.training or graphs.inference):
        del network.forward
        if graphs.instance_forward is not None:
            network.forward = graphs.instance_forward
    if recorded:
        gc.collect()  # a recorded training graph refers back to the network: collect that cycle and its pool
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def enable_training_graphs(network: nn.Module) -> nn.Module:
    """Make ``network``'s training steps replay as CUDA graphs from its first training call on (see the module
    docstring for when). Returns ``network``, whose parameters, buffers and state dict are unchanged. Not for
    DDP-wrapped or torch.compile'd networks: pass the plain module before wrapping."""
    _install(network).training = True
    return network


def enable_inference_graphs(network: nn.Module) -> nn.Module:
    """Make ``network``'s eval-mode, no-gradient calls on CUDA replay as CUDA graphs, one per input shape (see the
    module docstring). Returns ``network``; its state dict is unchanged."""
    _install(network).inference = True
    return network


def disable_training_graphs(network: nn.Module) -> None:
    """Training steps run kernel by kernel again; frees the training graphs and the memory they keep reserved."""
    _release(network, training=True)


def disable_inference_graphs(network: nn.Module) -> None:
    """Inference runs kernel by kernel again; frees the inference graphs and their memory."""
    _release(network, training=False)


def graphs_enabled(network: nn.Module, kind: str = "training") -> bool:
    """Whether ``kind`` ("training" or "inference") graphs are enabled for ``network``."""
    kind = _check_kind(kind)
    graphs = _graphs(network)
    return graphs is not None and getattr(graphs, kind)


def graphs_recorded(network: nn.Module, kind: str = "training") -> int:
    """How many ``kind`` graphs ``network`` holds recorded (training: 0 or 1)."""
    kind = _check_kind(kind)
    graphs = _graphs(network)
    if graphs is None:
        return 0
    if kind == "training":
        return int(graphs.training_forward is not None)
    return len(graphs.inference_graphs)


def ungraphed_forward(network: nn.Module):
    """``network``'s ordinary forward, which neither records nor replays graphs, whether graphs are enabled or not
    (a dry run, such as training/precompile.py's, must not record one)."""
    graphs = _graphs(network)
    return network.forward if graphs is None else graphs.eager_forward


def _check_kind(kind: str) -> str:
    if kind not in ("training", "inference"):
        raise ValueError(f"kind must be 'training' or 'inference', not {kind!r}")
    return kind
