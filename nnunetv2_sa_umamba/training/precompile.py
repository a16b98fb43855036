"""Compile every Triton kernel variant of a network's training step in parallel threads, before the first step.

On a fresh machine (empty Triton cache) the first training step compiles each Triton kernel variant it launches, one
after the other, about a second each. ``precompile_training_step`` runs one dry step instead, under ops/
compile_ahead.py's dry-run mode: its launches name exactly the variants the step needs, threads compile them, and
the real first step finds them compiled. The dry step runs forward and backward as training does, and by default
the eval-mode forward of nnU-Net's validation; everything else it runs (cuDNN's and cuBLAS's kernels, on garbage)
runs as in a real step, so cuDNN's autotuning for these shapes is done as well. It changes nothing that outlives it:
batch-norm statistics, gradients, the random generators and the modules' training modes are restored, and no CUDA
graph is recorded.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from nnunetv2_sa_umamba.ops.compile_ahead import compile_ahead, compile_ahead_supported
from nnunetv2_sa_umamba.ops.compile_stats import CompileRecord
from nnunetv2_sa_umamba.training.cuda_graphs import ungraphed_forward


def precompile_training_step(network: nn.Module, x: torch.Tensor, autocast_dtype: torch.dtype | None = torch.float16,
                             eval_forward: bool = True, max_workers: int | None = None) -> CompileRecord:
    """Compile the Triton kernels of ``network``'s training step on inputs like ``x`` (B, C, H, W), in parallel.

    ``network``: the plain module (not DDP-wrapped or compiled; CUDA graphs may be enabled), on ``x``'s device.
    ``x``: a batch of the training step's shape and dtype (its values do not matter). ``autocast_dtype``: the
    forward's CUDA autocast dtype in training (nnU-Net's: float16), None without autocast; the backward runs outside
    autocast, as nnU-Net's. ``eval_forward``: also the eval-mode forward without gradients that validation runs on
    batches of the same shape. ``max_workers``: compile threads (default: one per CPU; ops/compile_ahead.py).

    Returns the record of what compiled (``CompileRecord.format()`` prints it). Does nothing off CUDA, under Triton's
    interpreter or with a Triton before 3.4 (see ``compile_ahead_supported``), and returns an empty record.
    """
    if not (x.is_cuda and compile_ahead_supported()):
        return CompileRecord(observable=False)
    with compile_ahead(max_workers) as record:
        dry_training_step(network, x, autocast_dtype, eval_forward)
    torch.cuda.empty_cache()  # the dry step's blocks, cached on this stream
    return record


def dry_training_step(network: nn.Module, x: torch.Tensor, autocast_dtype: torch.dtype | None = torch.float16,
                      eval_forward: bool = True) -> None:
    """A training step's forward (under ``x``'s device's autocast in ``autocast_dtype``, None for none) and backward
    on ``x``, and with ``eval_forward`` validation's forward, leaving ``network`` as it was: buffers, gradients,
    random generators and training modes restored, no optimizer step, no CUDA graph recorded."""
    forward = ungraphed_forward(network)
    autocast = torch.autocast(x.device.type, dtype=autocast_dtype or torch.float16, enabled=autocast_dtype is not None)
    with _state_restored(network, x.device):
        network.train()
        with torch.enable_grad():
            with autocast:
                outputs = forward(x)
            _dry_loss(outputs).backward()
        del outputs
        if eval_forward:
            network.eval()
            with torch.no_grad(), autocast:
                forward(x)


def _dry_loss(outputs) -> torch.Tensor:
    """A scalar whose gradient reaches every output as a dense tensor of the output's shape (a loss's would)."""
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    return sum(output.float().square().mean() for output in outputs)


@contextmanager
def _state_restored(network: nn.Module, device: torch.device) -> Iterator[None]:
    """Restores what a dry step changes: buffers (batch-norm statistics), gradients, the CPU's and a CUDA
    ``device``'s random generators (drop path draws), and every module's training mode."""
    modes = [(module, module.training) for module in network.modules()]
    buffers = [(buffer, buffer.clone()) for buffer in network.buffers()]
    grads = [(parameter, parameter.grad) for parameter in network.parameters()]
    for parameter, _ in grads:
        parameter.grad = None  # the dry backward would otherwise add into an existing gradient in place
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
        for parameter, grad in grads:
            parameter.grad = grad
        for module, mode in modes:
            module.training = mode
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, device)
