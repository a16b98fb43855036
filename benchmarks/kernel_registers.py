"""Registers and spills of the fused RFAConv's Triton kernels, compiled for a Hopper GPU (sm_90a) on a machine
without one: Triton compiles each kernel to PTX on the CPU and the ptxas it bundles reports what the kernel needs
(`ptxas -v`). A kernel that spills moves registers through local memory on every tile, which no timing of its
arithmetic shows; this finds it before GPU time is spent on a tile sweep.

    TRITON_INTERPRET=0 python benchmarks/kernel_registers.py                  # each kernel at its launch tile
    TRITON_INTERPRET=0 python benchmarks/kernel_registers.py --kernels backward_features \\
        --tiles 16x16x4x16 16x16x8x16 16x8x4x16                               # tiles: POSITIONSxCHANNELSxWARPSxTILES

Operands as benchmark_rfaconv.py times them (float32 x and per-(k, c) vectors, bf16 (P, 9C) gradients, TF32
products as under 16-bit autocast). Prints a Markdown table: registers per thread (255 is the most ptxas gives),
bytes spilled per thread (stores / loads) and the stack frame.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

KERNELS = ("stats", "weighted", "backward_reduce", "backward_features", "backward_input")
HOPPER_CAPABILITY = 90
# pointer operands that are not float32 (benchmark_rfaconv.py's inputs)
BF16_POINTERS = {"grad_weighted_ptr", "grad_f_ptr", "out_ptr"}


def parse_tile(text: str) -> tuple[int, int, int, int]:
    try:
        positions, channels, warps, tiles = (int(v) for v in text.split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"a tile is POSITIONSxCHANNELSxWARPSxTILES, e.g. 16x16x4x16; got {text!r}") from None
    return positions, channels, warps, tiles


def parse_ptxas(report: str) -> dict:
    """Registers, spilled bytes (stores, loads) and stack frame bytes from ``ptxas -v``'s report of one kernel."""
    def number(pattern: str) -> int:
        match = re.search(pattern, report)
        if match is None:
            raise ValueError(f"ptxas reported no {pattern!r}: {report!r}")
        return int(match.group(1))

    return dict(registers=number(r"Used (\d+) registers"), spill_stores=number(r"(\d+) bytes spill stores"),
                spill_loads=number(r"(\d+) bytes spill loads"), stack=number(r"(\d+) bytes stack frame"))


def compile_and_report(kernels, name: str, tile: tuple[int, int, int, int], folder: Path) -> dict:
    """ptxas's figures for RFAConv kernel ``name`` compiled for Hopper with ``tile``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(kernels, f"_{name}_kernel")
    positions, channels, warps, tiles = tile
    constants = dict(TILES=tiles, BLOCK_P=positions, BLOCK_C=channels, BLOCK_K=kernels.BLOCK_K)
    if "PRECISION" in kernel.arg_names:  # the kernels that compute f, as under 16-bit autocast
        constants |= dict(PRECISION="tf32", F_BY_DOT=kernels._by_dot(name, "tf32"))
    signature = {arg: ("*bf16" if arg in BF16_POINTERS else "*fp32") if arg.endswith("_ptr") else "i32"
                 for arg in kernel.arg_names if arg not in constants}
    compiled = triton.compile(ASTSource(kernel, signature | dict.fromkeys(constants, "constexpr"), constants),
                              target=GPUTarget("cuda", HOPPER_CAPABILITY, 32), options={"num_warps": warps})
    ptx = folder / f"{name}.ptx"
    ptx.write_text(compiled.asm["ptx"])
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    result = subprocess.run([str(ptxas), "-v", "--gpu-name", f"sm_{HOPPER_CAPABILITY}a", str(ptx),
                             "-o", str(folder / f"{name}.cubin")], capture_output=True, text=True, check=True)
    return parse_ptxas(result.stderr)


def format_row(name: str, tile: tuple[int, int, int, int], own: bool, figures: dict) -> str:
    label = "x".join(str(v) for v in tile) + (" (launch tile)" if own else "")
    return (f"| {name} | {label} | {figures['registers']} | {figures['spill_stores']} / {figures['spill_loads']} | "
            f"{figures['stack']} |")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=KERNELS)
    parser.add_argument("--tiles", nargs="+", type=parse_tile, default=[],
                        help="tiles to compile besides each kernel's launch tile")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("kernel_registers.py compiles for the GPU: run it with TRITON_INTERPRET=0 (the interpreter "
                         "compiles nothing)")
    from triton.backends import backends
    if "nvidia" not in backends:
        raise SystemExit("this Triton has no CUDA backend to compile with")
    from nnunetv2_sa_umamba.ops.rfaconv import kernels

    print("| kernel | tile (positions x channels x warps x tiles) | registers | spilled bytes (stores / loads) | "
          "stack bytes |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for name in args.kernels:
            own = kernels.launch_tile(name, "tf32")
            for tile in dict.fromkeys([own, *args.tiles]):
                print(format_row(name, tile, tile == own, compile_and_report(kernels, name, tile, Path(folder))),
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
