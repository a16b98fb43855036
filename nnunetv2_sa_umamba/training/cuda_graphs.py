"""A network's training forward and backward replayed as CUDA graphs.

The fast path launches about 2000 small kernels per training step; on an H100 the GPU waits for Python between
many of them (docs/BENCHMARKS.md). PyTorch's ``make_graphed_callables`` records the forward and the backward once
and then replays each with one launch: the same kernels on the same tensors, so the same values. Random draws
(drop path) come from the same generator, advanced on every replay.

Only calls that look like the recorded one replay the graphs: training mode, gradients on, a CUDA input of the
recorded shape and dtype, the same autocast setting, the same trainable parameters. Any other call (validation,
prediction, another patch size) runs the ordinary forward. As with any CUDA graph, a replay writes its outputs
into the same tensors every step: copy an output that must outlive the next training step.
"""
from __future__ import annotations

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
    return (tuple(x.shape), x.dtype, x.device, x.requires_grad, autocast,
            torch.get_autocast_dtype("cuda") if autocast else None, torch.are_deterministic_algorithms_enabled(),
            getattr(network, "deep_supervision", None), tuple(p.requires_grad for p in network.parameters()))


class _TrainingGraphs:
    """Replaces ``network.forward``; records on the first training call and replays on matching ones."""

    def __init__(self, network: nn.Module):
        self.network = network
        self.eager_forward = network.forward
        self.signature = None
        self.graphed_forward = None
        self.failed = False

    def __call__(self, x: torch.Tensor, *args, **kwargs):
        signature = None if args or kwargs or self.failed else _call_signature(self.network, x)
        if signature is None:
            return self.eager_forward(x, *args, **kwargs)
        if self.graphed_forward is None:
            self._record(x, signature)
            if self.failed:
                return self.eager_forward(x)
        return self.graphed_forward(x) if signature == self.signature else self.eager_forward(x)

    def _record(self, x: torch.Tensor, signature: tuple) -> None:
        network = self.network
        # the warm-up passes must not move batch-norm running statistics
        buffers = [(buffer, buffer.clone()) for buffer in network.buffers()]
        autocast = torch.is_autocast_enabled("cuda")
        network.forward = self.eager_forward  # make_graphed_callables calls the module
        try:
            # make_graphed_callables refuses autocast's weight cache: its cast copies would outlive the recording
            with torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), enabled=autocast, cache_enabled=False):
                torch.cuda.make_graphed_callables(network, (x.detach().clone().requires_grad_(x.requires_grad),),
                                                  num_warmup_iters=WARMUP_STEPS, allow_unused_input=True)
            self.graphed_forward = network.forward
            self.signature = signature
        except RuntimeError as error:
            self.failed = True
            warnings.warn(f"Recording the training step as CUDA graphs failed ({error}); training continues "
                          f"without them.", RuntimeWarning, stacklevel=3)
        finally:
            network.forward = self
            with torch.no_grad():
                for buffer, saved in buffers:
                    buffer.copy_(saved)


def enable_training_graphs(network: nn.Module) -> nn.Module:
    """Make ``network``'s training steps replay as CUDA graphs from its first training call on (see the module
    docstring for when). Returns ``network``, whose parameters, buffers and state dict are unchanged. Not for
    DDP-wrapped or torch.compile'd networks: pass the plain module before wrapping."""
    if isinstance(network.forward, _TrainingGraphs):
        return network
    if network._forward_hooks or network._forward_pre_hooks or network._backward_hooks:
        raise ValueError("make_graphed_callables needs a network without module hooks; enable the graphs first, "
                         "then register hooks")
    network.forward = _TrainingGraphs(network)
    return network


def graphs_enabled(network: nn.Module) -> bool:
    return isinstance(network.__dict__.get("forward"), _TrainingGraphs)


def graphs_recorded(network: nn.Module) -> bool:
    graphs = network.__dict__.get("forward")
    return isinstance(graphs, _TrainingGraphs) and graphs.graphed_forward is not None
