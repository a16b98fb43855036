"""The fused RFAConv's five Triton kernels (ops/rfaconv/kernels.py) at the network's four stage shapes, per launch tile.

A tile is (positions per tile, channels per tile, warps, tiles per program); the kernels' own tiles are
``kernels.CONFIGS`` (and ``DOT_CONFIGS`` for the kernels that compute the features as matrix products under 16-bit
autocast, which this script runs: TF32 products, bf16 gradients, as in a bf16 training step). Each kernel is timed at
every stage (x: batch x 64 x 64 x 96, 32 x 32 x 192, 16 x 16 x 384, 8 x 8 x 768 for a 256 x 256 input) with each tile;
"sum" adds the four stages (the network runs two RFAConvs per stage, and the weighted-features kernel twice per
RFAConv in training). "max diff" is the largest difference of the kernel's outputs to those of its own tile, relative
to their largest value: reductions add in another order, nothing else should differ. Tiles that do not fit the GPU
(shared memory) are reported and skipped.

    python benchmarks/benchmark_rfaconv.py                                # CUDA, batch 28, every kernel
    python benchmarks/benchmark_rfaconv.py --kernels weighted --tiles 2x64x1 4x32x1 8x16x1
    python benchmarks/benchmark_rfaconv.py --smoke                        # a tiny shape, Triton's interpreter, CPU
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

if "--smoke" in sys.argv[1:]:
    # Triton chooses interpreted or compiled when it is imported (its own language functions too)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from triton.runtime.errors import OutOfResources  # noqa: E402

# the script's own folder is on sys.path: its sibling's timing helper
from benchmark_network import kernel_benchmark_mode, median_ms  # noqa: E402

STAGE_SHAPES = [(64, 96), (32, 192), (16, 384), (8, 768)]  # (side, channels) of RFAConv's input at 256 x 256
SMOKE_SHAPES = [(4, 16)]
KERNELS = ("stats", "weighted", "backward_reduce", "backward_features", "backward_input")
# positions x channels x warps tried by default: the fastest tiles of the H200 sweeps of docs/BENCHMARKS.md and their
# neighbours (few positions by wide channel runs for the streaming kernels, narrow channel tiles for the reducing
# ones), with tiles per program 1 and 4 for the kernels that reduce over positions (4 and 16 for the features backward)
DEFAULT_TILES = ["2x64x1", "1x128x1", "2x32x1", "4x32x1", "8x16x1", "16x8x1", "16x4x1", "16x16x2", "32x8x4", "64x8x4",
                 "16x8x4", "16x16x4"]
TILES_PER_PROGRAM = {"stats": (1, 4), "backward_reduce": (1, 4), "backward_features": (4, 16)}
# kernels whose tile feeds tl.dot with its positions (a dot needs at least 16 rows)
DOT_KERNELS = ("stats", "backward_reduce", "backward_features")


@dataclass
class Row:
    kernel: str
    tile: tuple[int, int, int, int]
    own_tile: bool
    stage_ms: list[float | None]
    max_diff: float | None
    note: str = ""

    @property
    def sum_ms(self) -> float | None:
        return None if None in self.stage_ms else sum(self.stage_ms)


def parse_tile(text: str) -> tuple[int, int, int]:
    try:
        positions, channels, warps = (int(v) for v in text.split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a tile is POSITIONSxCHANNELSxWARPS, e.g. 8x16x1; got {text!r}") from None
    return positions, channels, warps


def inputs(kernels, batch: int, side: int, channels: int, device: torch.device, seed: int = 0) -> dict:
    """Random operands of the five kernels at one stage, in the layouts the kernels take."""
    generator = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape, scale=1.0, dtype=torch.float32):
        return (torch.randn(*shape, generator=generator) * scale).to(device=device, dtype=dtype)

    positions, c9 = batch * side * side, kernels.POSITIONS * channels
    return dict(x=randn(batch, side, side, channels), wf=randn(9, 9, channels, scale=0.3),
                wc=randn(9, channels), scale=randn(9, channels).abs() + 0.5, shift=randn(9, channels, scale=0.1),
                grad_weighted=randn(positions, c9, dtype=torch.bfloat16),
                coefs=[randn(9, channels, scale=0.1) for _ in range(3)],
                grad_f=randn(positions, c9, dtype=torch.bfloat16), grad_pooled=randn(positions, channels))


def call(kernels, name: str, a: dict):
    """One launch of kernel ``name`` through its Python entry point; returns its outputs."""
    if name == "stats":
        return kernels.feature_statistics(a["x"], a["wf"], "tf32")
    if name == "weighted":
        return kernels.weighted_features(a["x"], a["wf"], a["wc"], a["scale"], a["shift"], torch.bfloat16, "tf32")
    if name == "backward_reduce":
        return kernels.backward_reduce(a["x"], a["wf"], a["wc"], a["scale"], a["shift"], a["grad_weighted"], "tf32")
    if name == "backward_features":
        return kernels.backward_features(a["x"], a["wf"], a["wc"], a["scale"], a["shift"], a["grad_weighted"],
                                         *a["coefs"], "tf32")
    return kernels.backward_input(a["x"], a["wf"], a["grad_f"], a["grad_pooled"])


@contextmanager
def launch_tile(kernels, name: str, tile: tuple[int, int, int, int]):
    """Kernel ``name`` launched with ``tile`` inside the block (both of its configuration tables)."""
    saved = [(table, table[name]) for table in (kernels.CONFIGS, kernels.DOT_CONFIGS) if name in table]
    for table, _ in saved:
        table[name] = tile
    try:
        yield
    finally:
        for table, own in saved:
            table[name] = own


def own_tile(kernels, name: str) -> tuple[int, int, int, int]:
    """The tile the kernel launches with under 16-bit autocast (TF32 products, as ``call`` runs it)."""
    return kernels.launch_tile(name, "tf32")


def candidate_tiles(kernels, name: str, tiles: list[tuple[int, int, int]]) -> list[tuple[int, int, int, int]]:
    """The kernel's own tile first, then every requested tile with each of its tiles-per-program values."""
    own = own_tile(kernels, name)
    candidates = [own]
    for positions, channels, warps in tiles:
        if name in DOT_KERNELS and positions < 16:
            continue
        for per_program in TILES_PER_PROGRAM.get(name, (1,)):
            tile = (positions, channels, warps, per_program)
            if tile not in candidates:
                candidates.append(tile)
    return candidates


def _flat(outputs) -> list[torch.Tensor]:
    return [t.float() for t in (outputs if isinstance(outputs, tuple) else (outputs,))]


def relative_diff(outputs, reference) -> float:
    pairs = list(zip(_flat(outputs), _flat(reference), strict=True))
    largest = max(r.abs().max().item() for _, r in pairs) or 1.0
    return max((o - r).abs().max().item() for o, r in pairs) / largest


def measure(kernels, name: str, tiles, stage_inputs: list[dict], device: torch.device, warmup: int,
            iters: int, max_tiles: int | None = None) -> list[Row]:
    references = [call(kernels, name, a) for a in stage_inputs]
    rows = []
    for tile in candidate_tiles(kernels, name, tiles)[:max_tiles]:
        row = Row(name, tile, tile == own_tile(kernels, name), [], None)
        try:
            with launch_tile(kernels, name, tile):
                diffs = [relative_diff(call(kernels, name, a), ref)
                         for a, ref in zip(stage_inputs, references, strict=True)]
                row.stage_ms = [median_ms(lambda a=a: call(kernels, name, a), device, warmup, iters)
                                for a in stage_inputs]
            row.max_diff = max(diffs)
        except OutOfResources as error:  # a tile too large for the GPU: reported, not fatal
            row.stage_ms, row.note = [None] * len(stage_inputs), f"does not fit: {str(error)[:80]}"
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_row(row: Row) -> str:
    positions, channels, warps, per_program = row.tile
    tile = f"{positions} x {channels}, {warps} warps, {per_program}/program" + (" (own)" if row.own_tile else "")
    diff = "-" if row.max_diff is None else f"{row.max_diff:.1e}"
    return (f"| {row.kernel} | {tile} | {' | '.join(_ms(v) for v in row.stage_ms)} | {_ms(row.sum_ms)} | {diff} | "
            f"{row.note} |")


def best_tiles(rows: list[Row]) -> str:
    """Per kernel, its own tile's sum and the fastest tile's."""
    lines = ["| kernel | own tile: sum (ms) | fastest tile | its sum (ms) |", "|---|---|---|---|"]
    for name in dict.fromkeys(r.kernel for r in rows):
        mine = [r for r in rows if r.kernel == name and r.sum_ms is not None]
        if not mine:
            continue
        own = next((r for r in mine if r.own_tile), None)
        fastest = min(mine, key=lambda r: r.sum_ms)
        lines.append(f"| {name} | {_ms(own.sum_ms if own else None)} | {'x'.join(map(str, fastest.tile))} | "
                     f"{_ms(fastest.sum_ms)} |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernels", nargs="+", choices=KERNELS, default=list(KERNELS))
    parser.add_argument("--tiles", nargs="+", type=parse_tile, default=None,
                        help="POSITIONSxCHANNELSxWARPS tiles to try besides each kernel's own (default: 12 of them)")
    parser.add_argument("--batch", type=int, default=28)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny shape and two tiles per kernel on the CPU in Triton's interpreter (the tests)")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = parser.parse_args(argv)
    kernel_benchmark_mode(parser, args, "RFAConv's kernels are")
    if args.smoke:
        args.tiles = args.tiles or [parse_tile("16x16x1")]
    args.tiles = args.tiles or [parse_tile(t) for t in DEFAULT_TILES]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from nnunetv2_sa_umamba.ops.rfaconv import kernels

    device = torch.device("cpu" if args.smoke else "cuda")
    shapes = SMOKE_SHAPES if args.smoke else STAGE_SHAPES
    stage_inputs = [inputs(kernels, args.batch, side, channels, device) for side, channels in shapes]
    stages = " | ".join(f"{args.batch} x {side} x {side} x {channels} (ms)" for side, channels in shapes)
    print(f"| kernel | tile | {stages} | sum (ms) | max diff | note |\n|" + "---|" * (len(shapes) + 5))
    rows = []
    for name in args.kernels:
        # (the smoke run: each kernel's own tile and one other, as the interpreter is slow)
        rows += measure(kernels, name, args.tiles, stage_inputs, device, args.warmup, args.iters,
                        max_tiles=2 if args.smoke else None)
    print("\n" + best_tiles(rows))
    if args.json:
        device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (Triton interpreter)"
        args.json.write_text(json.dumps(dict(device=device_name, batch=args.batch, shapes=shapes,
                                             rows=[asdict(r) | {"sum_ms": r.sum_ms} for r in rows]), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
