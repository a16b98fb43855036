"""The selective scan alone at SS2D's four scan shapes, kernel by kernel: forward and forward + backward.

Rows per stage (channels = 4 directions x d_inner, L = H x W of a 256 x 256 input; bf16 u, delta, B, C; float32
A, D and delta bias; N = 16, 4 groups of B and C, softplus on): mamba-ssm's kernel (``cuda``, through
ops/scan/cuda_backend.py, when it imports), our sequential Triton forward beside mamba-ssm's backward
(``cuda+sequential``, ops/scan/sequential_forward.py), our sequential forward and backward (``sequential``,
ops/scan/sequential_backward.py) and our chunked Triton kernels (``triton``, ops/scan/kernels.py).
Kernels are called directly, without autograd; forward + backward is one forward and one backward call. Times are
medians of triton.testing.do_bench (CUDA events, L2 flushed between runs; the first call, which compiles, is not
timed). "per step" is count x fwd+bwd: the scans of one training step at that stage. "max err" is the largest error
of y and of the seven gradients relative to the largest value of the stage's first row, a check that both compute the
same scan.

    python benchmarks/benchmark_scan.py                        # CUDA, batch 28
    python benchmarks/benchmark_scan.py --stages 3 4 --json scan.json   # only the 16 x 16 and 8 x 8 stages
    python benchmarks/benchmark_scan.py --smoke                # tiny shapes, CPU, Triton's interpreter (the tests)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

if "--smoke" in sys.argv[1:]:
    # Triton chooses interpreted or compiled when it is imported (its own language functions too), and the timing
    # helper below imports it
    os.environ.setdefault("TRITON_INTERPRET", "1")

# the script's own folder is on sys.path: its sibling's timing helper
from benchmark_network import kernel_benchmark_mode, median_ms  # noqa: E402

# (channels, L, scans per training step) of SS2D at each stage of SA-UMamba at 256 x 256 (dims 96..768, d_inner =
# 2 x dim, 4 directions); a stage's count is its encoder and decoder blocks (3 at stage 1: 2 + 1)
STAGES = [(768, 4096, 3), (1536, 1024, 4), (3072, 256, 4), (6144, 64, 4)]
SMOKE_STAGES = [(8, 12, 1), (8, 4, 1)]
D_STATE = 16
GROUPS = 4


@dataclass
class Row:
    implementation: str
    stage: int
    shape: str
    count: int
    forward_ms: float
    forward_backward_ms: float
    max_err: float | None

    @property
    def per_step_ms(self) -> float:
        return self.count * self.forward_backward_ms


@dataclass
class Implementation:
    """A scan as two calls: forward(inputs) -> (y, saved) and backward(dy, inputs, saved) -> seven gradients."""
    name: str
    forward: Callable
    backward: Callable


def scan_inputs(batch: int, channels: int, length: int, device: torch.device, dtype: torch.dtype) -> dict:
    """Random inputs as SS2D gives them at initialisation (A = -(1..N), D = 1, delta's bias the inverse softplus
    of steps log-uniform in [1e-3, 0.1]) and y's gradient dy; the same for every implementation."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    steps = torch.exp(torch.rand(channels, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    return dict(u=randn(batch, channels, length), delta=randn(batch, channels, length) * 0.5,
                A=-torch.arange(1, D_STATE + 1, dtype=torch.float32).repeat(channels, 1).to(device),
                B=randn(batch, GROUPS, D_STATE, length), C=randn(batch, GROUPS, D_STATE, length),
                D=torch.ones(channels, device=device),
                delta_bias=(steps + torch.log(-torch.expm1(-steps))).to(device), dy=randn(batch, channels, length))


def _args(inputs: dict) -> tuple:
    return tuple(inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "delta_bias"))


def cuda_implementation() -> Implementation | None:
    """mamba-ssm's kernel through our registered ops, or None when it does not import."""
    from nnunetv2_sa_umamba.ops.scan import cuda_backend
    if not torch.cuda.is_available() or not cuda_backend.kernel_available():
        return None

    def forward(inputs):
        return torch.ops.saumamba.scan_cuda_fwd(*_args(inputs), True)

    def backward(dy, inputs, saved):
        return torch.ops.saumamba.scan_cuda_bwd(dy, *_args(inputs), saved, True)

    return Implementation("cuda", forward, backward)


def cuda_sequential_implementation() -> Implementation | None:
    """Our sequential Triton forward (ops/scan/sequential_forward.py, B and C transposes included) beside mamba-ssm's
    backward, as the fast path runs them; None when mamba-ssm's kernel does not import."""
    cuda = cuda_implementation()
    if cuda is None:
        return None
    from nnunetv2_sa_umamba.ops.scan import sequential_forward

    def forward(inputs):
        return sequential_forward.forward(*_args(inputs), True)

    return Implementation("cuda+sequential", forward, cuda.backward)


# the rows that need mamba-ssm's kernel: name -> builder (None where the kernel does not import)
CUDA_IMPLEMENTATIONS = {"cuda": cuda_implementation, "cuda+sequential": cuda_sequential_implementation}


def triton_implementation(module, name: str) -> Implementation:
    """A module with forward/backward as ops/scan/kernels.py has them."""
    def forward(inputs):
        return module.forward(*_args(inputs), True), None

    def backward(dy, inputs, saved):
        return module.backward(dy, *_args(inputs), True)

    return Implementation(name, forward, backward)


def sequential_implementation() -> Implementation:
    """Our step-by-step Triton forward and backward (B and C transposes included); no mamba-ssm needed."""
    from nnunetv2_sa_umamba.ops.scan import sequential_backward, sequential_forward

    def forward(inputs):
        return sequential_forward.forward(*_args(inputs), True)

    def backward(dy, inputs, saved):
        return sequential_backward.backward(dy, *_args(inputs), True)

    return Implementation("sequential", forward, backward)


# the rows that need no mamba-ssm (they also run under --smoke): name -> builder
TRITON_IMPLEMENTATIONS = {"sequential": sequential_implementation}


def timed(fn: Callable, device: torch.device, warmup: int, iters: int) -> tuple[float, object]:
    """(median ms of ``fn``, one of its results). The first call, which compiles, is not timed; then CUDA: triton's
    do_bench times ``warmup`` and ``iters`` milliseconds; CPU: benchmark_network's median over ``warmup`` and
    ``iters`` calls."""
    result = fn()
    if device.type == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=warmup, rep=iters, return_mode="median"), result
    return median_ms(fn, device, warmup, iters), result


def max_error(result: tuple, reference: tuple) -> float:
    """Largest error over y and the gradients, each relative to its reference's largest magnitude."""
    errors = []
    for x, ref in zip(result, reference, strict=True):
        if ref is None or ref.numel() == 0:
            continue
        x, ref = x.double(), ref.double()
        errors.append(((x - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item())
    return max(errors)


def measure(impl: Implementation, stage: int, batch: int, channels: int, length: int, count: int,
            device: torch.device, args, reference: tuple | None) -> tuple[Row, tuple]:
    inputs = scan_inputs(batch, channels, length, device, torch.bfloat16)
    dy = inputs["dy"]

    def forward():
        return impl.forward(inputs)

    def forward_backward():
        y, saved = impl.forward(inputs)
        return y, impl.backward(dy, inputs, saved)

    forward_ms, _ = timed(forward, device, args.warmup, args.iters)
    forward_backward_ms, (y, grads) = timed(forward_backward, device, args.warmup, args.iters)
    result = (y, *grads)
    row = Row(impl.name, stage, f"{batch}x{channels}x{length}", count, forward_ms, forward_backward_ms,
              None if reference is None else max_error(result, reference))
    return row, result


def format_row(row: Row) -> str:
    err = "-" if row.max_err is None else f"{row.max_err:.1e}"
    return (f"| {row.stage} | {row.shape} | {row.implementation} | "
            f"{row.forward_ms:.3f} | {row.forward_backward_ms:.3f} | {row.count} | {row.per_step_ms:.2f} | {err} |")


HEADER = ("| stage | batch x channels x L | implementation | fwd ms | fwd+bwd ms | count | per step ms | max err |\n"
          "|---|---|---|---|---|---|---|---|")


def summary(rows: list[Row]) -> str:
    """Per implementation: the scans of one training step summed over the stages timed."""
    lines = ["| implementation | stages | per step ms (sum of count x fwd+bwd) |", "|---|---|---|"]
    for implementation in dict.fromkeys(r.implementation for r in rows):
        mine = [r for r in rows if r.implementation == implementation]
        lines.append(f"| {implementation} | {len(mine)} | {sum(r.per_step_ms for r in mine):.2f} |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=28)
    parser.add_argument("--stages", type=int, nargs="+", default=None, choices=[1, 2, 3, 4], help="only these stages")
    names = [*CUDA_IMPLEMENTATIONS, *TRITON_IMPLEMENTATIONS, "triton"]
    parser.add_argument("--implementations", nargs="+", default=names, choices=names)
    parser.add_argument("--warmup", type=int, default=25, help="ms of warm-up (CUDA) or calls (--smoke)")
    parser.add_argument("--iters", type=int, default=100, help="ms of timed runs (CUDA) or calls (--smoke)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on the CPU in Triton's interpreter, one call each (used by the tests)")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = parser.parse_args(argv)
    kernel_benchmark_mode(parser, args, "the scan kernels are")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cpu" if args.smoke else "cuda")
    from nnunetv2_sa_umamba.ops.scan import kernels

    stages = SMOKE_STAGES if args.smoke else STAGES
    chosen = [(i + 1, *stage) for i, stage in enumerate(stages) if args.stages is None or i + 1 in args.stages]
    implementations = []
    for name in args.implementations:
        if name in CUDA_IMPLEMENTATIONS:
            impl = None if args.smoke else CUDA_IMPLEMENTATIONS[name]()
            if impl is None:
                print(f"{name}: no rows (" + ("--smoke runs on the CPU" if args.smoke
                                              else "mamba-ssm's selective_scan_cuda is not importable here") + ")")
            else:
                implementations.append(impl)
        elif name in TRITON_IMPLEMENTATIONS:
            implementations.append(TRITON_IMPLEMENTATIONS[name]())
        else:
            implementations.append(triton_implementation(kernels, "triton"))
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    print(f"device: {device_name} | torch {torch.__version__} | batch {args.batch} | bf16 inputs, N = {D_STATE}, "
          f"{GROUPS} groups")
    print(HEADER)
    rows = []
    for stage, channels, length, count in chosen:
        reference = None
        for impl in implementations:
            row, result = measure(impl, stage, args.batch, channels, length, count, device, args, reference)
            if reference is None:
                reference, row.max_err = result, 0.0
            rows.append(row)
            print(format_row(row), flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print()
    print(summary(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": device_name, "torch": torch.__version__, "batch": args.batch,
                                         "rows": [asdict(r) | {"per_step_ms": r.per_step_ms} for r in rows]},
                                        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
