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
``MAX_INFERENCE_GRAPHS`` at a time, and replayed; each call returns a copy of the outputs, so callers may keep
them.
"""
from __future__ import annotations

import gc
import inspect
import warnings

import torch
from torch import nn

WARMUP_STEPS = 3  # eager passes before recording (cuDNN autotuning, Triton compilation)
MAX_INFERENCE_GRAPHS = 4  # input shapes kept recorded at once; the oldest is dropped first


def _common_signature(network: nn.Module, x: torch.Tensor) -> tuple:
    autocast = torch.is_autocast_enabled("cuda")
    return (tuple(x.shape), x.dtype, x.device, autocast, torch.get_autocast_dtype("cuda") if autocast else None,
            torch.are_deterministic_algorithms_enabled(), getattr(network, "deep_supervision", None),
            # a graph reads the tensors where they were when recorded (.to(), .half(), assign=True loads move them)
            tuple(buffer.data_ptr() for buffer in network.buffers()))


def _graphable(x: torch.Tensor) -> bool:
    return x.is_cuda and not (torch.jit.is_tracing() or torch.compiler.is_compiling())


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
    return (_common_signature(network, x), x.requires_grad, tuple((p.requires_grad, p.data_ptr()) for p in parameters))


def _inference_signature(network: nn.Module, x: torch.Tensor) -> tuple | None:
    """Eval mode without gradients only: training mode would update batch-norm statistics and draw drop paths."""
    if network.training or torch.is_grad_enabled() or not _graphable(x):
        return None
    # inference mode: the recorded input is an inference tensor, which only inference mode may copy into
    return (_common_signature(network, x), torch.is_inference_mode_enabled(),
            tuple(p.data_ptr() for p in network.parameters()))


def _make_graphed_callables_capture_mode() -> dict:
    """thread_local where torch offers the choice (2.13+): then CUDA calls of other threads, such as nnU-Net's
    pin-memory thread, may go on during the recording instead of invalidating it."""
    if "capture_error_mode" in inspect.signature(torch.cuda.make_graphed_callables).parameters:
        return {"capture_error_mode": "thread_local"}
    return {}


def _clone_outputs(outputs):
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(output.clone() for output in outputs)
    return outputs.clone()


def _autocast_without_cache():
    """The caller's autocast setting without its weight cache: cast copies cached during a recording would be freed
    when the caller's autocast block ends, while the graph still reads them."""
    return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), enabled=torch.is_autocast_enabled("cuda"),
                          cache_enabled=False)


class _InferenceGraph:
    def __init__(self, forward, x: torch.Tensor):
        self.static_input = x.detach().clone()
        side_stream = torch.cuda.Stream()
        side_stream.wait_stream(torch.cuda.current_stream())
        with _autocast_without_cache():
            with torch.cuda.stream(side_stream):
                for _ in range(WARMUP_STEPS):
                    forward(self.static_input)
            torch.cuda.current_stream().wait_stream(side_stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.static_outputs = forward(self.static_input)

    def __call__(self, x: torch.Tensor):
        self.static_input.copy_(x)
        self.graph.replay()
        return _clone_outputs(self.static_outputs)


class _GraphedForward:
    """Replaces ``network.forward``; records on the first matching call and replays on later ones."""

    def __init__(self, network: nn.Module):
        self.network = network
        self.eager_forward = network.forward
        self.training = False
        self.inference = False
        self.training_signature = None
        self.training_forward = None
        self.training_failed = False
        self.inference_graphs: dict[tuple, _InferenceGraph] = {}
        self.inference_failed = False

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
            if self.inference and not self.inference_failed:
                signature = _inference_signature(self.network, x)
                if signature is not None:
                    graph = self.inference_graphs.get(signature) or self._record_inference(x, signature)
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
            with torch.autocast("cuda", enabled=False):
                self.training_forward = torch.cuda.make_graphed_callables(
                    autocast_forward, (x.detach().clone().requires_grad_(x.requires_grad),),
                    num_warmup_iters=WARMUP_STEPS, allow_unused_input=True,
                    **_make_graphed_callables_capture_mode()).forward
            self.training_signature = signature
            torch.cuda.empty_cache()  # the warm-up passes' blocks, cached on their side stream
        except Exception as error:  # noqa: BLE001 - any failure to record leaves eager training, which works
            self.training_failed = True
            _warn_failed("training step", error)
        finally:
            with torch.no_grad():
                for buffer, saved in buffers:
                    buffer.copy_(saved)

    def _record_inference(self, x: torch.Tensor, signature: tuple) -> _InferenceGraph | None:
        if len(self.inference_graphs) >= MAX_INFERENCE_GRAPHS:
            del self.inference_graphs[next(iter(self.inference_graphs))]
        try:
            graph = self.inference_graphs[signature] = _InferenceGraph(self.eager_forward, x)
            torch.cuda.empty_cache()
            return graph
        except Exception as error:  # noqa: BLE001 - as for training: the ordinary forward works
            self.inference_failed = True
            _warn_failed("inference forward", error)
            return None

    def release(self, training: bool) -> None:
        if training:
            self.training = False
            self.training_signature = self.training_forward = None
        else:
            self.inference = False
            self.inference_graphs.clear()


def _warn_failed(what: str, error: Exception) -> None:
    warnings.warn(f"Recording the {what} as a CUDA graph failed ({error}); it runs without graphs from now on.",
                  RuntimeWarning, stacklevel=4)


class _AutocastForward(nn.Module):
    """The network's ordinary forward under the autocast setting of the recorded call; make_graphed_callables
    records this module, whose parameters are the network's."""

    def __init__(self, network: nn.Module, eager_forward):
        super().__init__()
        self.network = network
        self.eager_forward = eager_forward
        self.autocast = torch.is_autocast_enabled("cuda")
        self.autocast_dtype = torch.get_autocast_dtype("cuda")

    def forward(self, x: torch.Tensor):
        # make_graphed_callables refuses autocast's weight cache (see _autocast_without_cache)
        with torch.autocast("cuda", dtype=self.autocast_dtype, enabled=self.autocast, cache_enabled=False):
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
    graphs.release(training)
    if not (graphs.training or graphs.inference):
        del network.forward
        graphs.network = graphs.eager_forward = None
    gc.collect()  # the recorded graphs hold their memory pools until collected
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


def _check_kind(kind: str) -> str:
    if kind not in ("training", "inference"):
        raise ValueError(f"kind must be 'training' or 'inference', not {kind!r}")
    return kind
