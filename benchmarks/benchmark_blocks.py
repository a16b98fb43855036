"""Where SA-UMamba's training step spends its time and memory, module by module, at the network's real shapes.

Every SS2D, RFAConv, block and resampling module is timed on its own (forward + backward with a random output
gradient) on the input shapes it sees inside the network for the given batch, and multiplied by how often it
occurs; the selective scan is also timed alone on the same shapes. "held" is the memory a module's forward
keeps alive for the backward (its saved tensors and output). Rows of one run are comparable; sums do not add
up to the full step exactly (the optimizer, the loss and launch gaps are outside every module).

    python benchmarks/benchmark_blocks.py                          # CUDA, batch 28 x 3 x 256 x 256, bf16
    python benchmarks/benchmark_blocks.py --implementations reference fast
    python benchmarks/benchmark_blocks.py --smoke                  # tiny CPU run (used by the tests)
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from nnunetv2_sa_umamba.architectures.sa_umamba import SAUMamba
from nnunetv2_sa_umamba.modules.blocks import PatchEmbed, PatchExpand, PatchMerging, RSSSBlock, VSSBlock
from nnunetv2_sa_umamba.modules.rfaconv import RFAConv
from nnunetv2_sa_umamba.modules.ss2d import NUM_DIRECTIONS, SS2D, scan_dtype
from nnunetv2_sa_umamba.ops.policy import kernel_policy
from nnunetv2_sa_umamba.ops.scan import selective_scan

# the script's own folder is on sys.path: its sibling's timing helpers
from benchmark_network import DTYPES, median_ms, synchronize

MODULE_TYPES = (RSSSBlock, VSSBlock, SS2D, RFAConv, PatchEmbed, PatchMerging, PatchExpand)


@dataclass
class Row:
    implementation: str
    module: str
    input_shape: str
    count: int
    forward_ms: float
    forward_backward_ms: float
    held_mib: float | None

    @property
    def total_ms(self) -> float:
        return self.count * self.forward_backward_ms


def captured_inputs(model: nn.Module, x: torch.Tensor, autocast) -> Counter:
    """(module type name, input shape, representative module) -> number of calls in one forward."""
    seen: Counter = Counter()
    representatives: dict = {}

    def hook(module, args, kwargs):
        key = (type(module).__name__, tuple(args[0].shape), tuple(sorted(kwargs.items())))
        representatives.setdefault(key, module)
        seen[key] += 1

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in model.modules()
               if isinstance(m, MODULE_TYPES)]
    with torch.no_grad(), autocast:
        model(x)
    for handle in handles:
        handle.remove()
    return Counter({(name, shape, kwargs, representatives[(name, shape, kwargs)]): n
                    for (name, shape, kwargs), n in seen.items()})


def time_module(fn, inputs: list[torch.Tensor], device: torch.device, warmup: int, iters: int):
    """Median forward and forward+backward ms, and the memory the forward keeps for the backward."""
    def forward():
        with torch.no_grad():
            fn(*inputs)

    def forward_backward():
        out = fn(*inputs)
        out.backward(torch.ones_like(out))

    forward_ms = median_ms(forward, device, warmup, iters)
    forward_backward_ms = median_ms(forward_backward, device, warmup, iters)
    held = None
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        out = fn(*inputs)
        synchronize(device)
        held = (torch.cuda.memory_allocated(device) - before) / 2 ** 20
        del out
    for t in inputs:
        t.grad = None
    return forward_ms, forward_backward_ms, held


def scan_inputs(ss2d: SS2D, shape: tuple, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
    """Random inputs of the selective scan that ``ss2d`` runs on a (B, H, W, C) input."""
    b, h, w, _ = shape
    k, d, n, length = NUM_DIRECTIONS, ss2d.d_inner, ss2d.d_state, h * w
    u = torch.randn(b, k * d, length, device=device, dtype=dtype, requires_grad=True)
    delta = (torch.randn(b, k * d, length, device=device, dtype=dtype) * 0.5 - 4).requires_grad_()
    bs = torch.randn(b, k, n, length, device=device, dtype=dtype, requires_grad=True)
    cs = torch.randn(b, k, n, length, device=device, dtype=dtype, requires_grad=True)
    return [u, delta, bs, cs]


def measure_implementation(args, implementation: str, device: torch.device) -> list[Row]:
    batch, channels, size = args.shape
    dtype = DTYPES[args.dtype]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
    arch = dict(dims=(24, 48, 96, 192)) if args.smoke else {}
    torch.manual_seed(0)
    model = SAUMamba(channels, args.classes, kernels=kernel_policy(implementation), **arch).to(device).train()
    x = torch.randn(batch, channels, size, size, device=device)
    rows = []
    for (name, shape, kwargs, module), count in captured_inputs(model, x, autocast).items():
        first_new = len(rows)
        inp = torch.randn(shape, device=device, requires_grad=True)
        module_kwargs = dict(kwargs)

        def run_module(t, module=module, kwargs=module_kwargs):
            with autocast:
                return module(t, **kwargs)

        fwd, fwd_bwd, held = time_module(run_module, [inp], device, args.warmup, args.iters)
        shape_text = "x".join(map(str, shape))
        rows.append(Row(implementation, name, shape_text, count, fwd, fwd_bwd, held))
        if name == "SS2D":
            a, ds, dt_bias = (t.detach() for t in module.scan_parameters())
            with autocast:
                dtype_of_scan = scan_dtype(inp) if implementation == "fast" else torch.float32
            tensors = scan_inputs(module, shape, device, dtype_of_scan)

            def run_scan(u, delta, bs, cs, module=module, a=a, ds=ds, bias=dt_bias):
                return selective_scan(u, delta, a, bs, cs, ds, delta_bias=bias, delta_softplus=True,
                                      backend=module.kernels.scan)

            fwd, fwd_bwd, held = time_module(run_scan, tensors, device, args.warmup, args.iters)
            rows.append(Row(implementation, "selective_scan (in SS2D)", shape_text, count, fwd, fwd_bwd, held))
        for row in rows[first_new:]:
            print(format_row(row), flush=True)
    return rows


def format_row(row: Row) -> str:
    held = f"{row.held_mib:.0f}" if row.held_mib is not None else "-"
    total_held = f"{row.held_mib * row.count:.0f}" if row.held_mib is not None else "-"
    return (f"| {row.implementation} | {row.module} | {row.input_shape} | {row.count} | {row.forward_ms:.2f} | "
            f"{row.forward_backward_ms:.2f} | {row.total_ms:.1f} | {held} | {total_held} |")


HEADER = ("| implementation | module | input | count | fwd ms | fwd+bwd ms | count x fwd+bwd ms | held MiB | "
          "count x held MiB |\n|---|---|---|---|---|---|---|---|---|")


def summary(rows: list[Row]) -> str:
    """Totals per implementation and module type (blocks include their SS2D and RFAConv)."""
    lines = ["| implementation | module | total fwd+bwd ms | total held MiB |", "|---|---|---|---|"]
    keys = sorted({(r.implementation, r.module) for r in rows}, key=lambda k: (k[0], k[1]))
    for implementation, module in keys:
        group = [r for r in rows if r.implementation == implementation and r.module == module]
        held = sum(r.held_mib * r.count for r in group) if all(r.held_mib is not None for r in group) else None
        lines.append(f"| {implementation} | {module} | {sum(r.total_ms for r in group):.1f} | "
                     f"{f'{held:.0f}' if held is not None else '-'} |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", default=None, help="BxCxS (square input), default 28x3x256")
    parser.add_argument("--dtype", default=None, choices=list(DTYPES), help="default bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument("--implementations", nargs="+", default=["fast"], choices=["reference", "fast"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run: narrow network, 1x3x64, 1 iteration")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.shape = args.shape or "1x3x64"
        args.warmup, args.iters = 0, 1
    args.shape = tuple(int(v) for v in (args.shape or "28x3x256").split("x"))
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {device_name} | torch {torch.__version__} | input {args.shape} | {args.dtype}")
    print(HEADER)
    rows = [row for impl in args.implementations for row in measure_implementation(args, impl, device)]
    print()
    print(summary(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": device_name, "torch": torch.__version__,
                                         "rows": [asdict(r) | {"total_ms": r.total_ms} for r in rows]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
