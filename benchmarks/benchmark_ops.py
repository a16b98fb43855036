"""Forward+backward time of the convolutions inside SA-UMamba, in several formulations that compute the same
values, to pick the fast path's. CUDA; bf16 autocast; stage-0 shapes at batch 28 x 256 x 256.

    python benchmarks/benchmark_ops.py [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F


def depthwise_cudnn(x, weight, bias):
    return F.conv2d(x, weight, bias, padding=1, groups=x.shape[1])


def grouped_9x_cudnn(x, weight):
    return F.conv2d(x, weight, padding=1, groups=x.shape[1])


def grouped_9x_unfold(x, weight):
    b, c, h, w = x.shape
    columns = F.unfold(x, 3, padding=1).view(b, c, 9, h * w)
    return torch.einsum("cnk,bckl->bcnl", weight.view(c, 9, 9), columns).reshape(b, c * 9, h, w)


def grouped_9x_shifts(x, weight):
    b, c, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1)).unsqueeze(2)
    taps = weight.view(1, c, 9, 3, 3)
    out = None
    for i in range(3):
        for j in range(3):
            term = padded[..., i:i + h, j:j + w] * taps[..., i:i + 1, j:j + 1]
            out = term if out is None else out + term
    return out.view(b, c * 9, h, w)


def time_fwd_bwd(fn, inputs, iters=20, warmup=5) -> float:
    def step():
        out = fn(*inputs)
        out.backward(torch.ones_like(out))
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=28)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    dev = torch.device("cuda")
    b = args.batch
    results = []

    def record(op, variant, fn, inputs, channels_last=False, benchmark=False):
        torch.backends.cudnn.benchmark = benchmark
        if channels_last:
            inputs = [inputs[0].detach().to(memory_format=torch.channels_last).requires_grad_()] + inputs[1:]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            ms = time_fwd_bwd(fn, inputs)
        results.append(dict(op=op, variant=variant, cudnn_benchmark=benchmark, channels_last=channels_last, ms=ms))
        print(f"| {op} | {variant} | {benchmark} | {channels_last} | {ms:.2f} |", flush=True)

    print("| op | formulation | cudnn.benchmark | channels_last | fwd+bwd ms |\n|---|---|---|---|---|")
    for d in (192, 384):
        size = 64 if d == 192 else 32
        x = torch.randn(b, d, size, size, device=dev, requires_grad=True)
        wt = torch.randn(d, 1, 3, 3, device=dev, requires_grad=True)
        bias = torch.randn(d, device=dev, requires_grad=True)
        for bench in (False, True):
            for cl in (False, True):
                record(f"SS2D depthwise 3x3, {d}ch {size}x{size}", "cudnn", depthwise_cudnn, [x, wt, bias], cl, bench)
    compiled_shifts = torch.compile(grouped_9x_shifts)
    for c in (96, 192):
        size = 64 if c == 96 else 32
        x = torch.randn(b, c, size, size, device=dev, requires_grad=True)
        wt = torch.randn(9 * c, 1, 3, 3, device=dev, requires_grad=True)
        op = f"RFAConv feature 3x3 {c}->{9 * c} groups={c}, {size}x{size}"
        for bench in (False, True):
            for cl in (False, True):
                record(op, "cudnn", grouped_9x_cudnn, [x, wt], cl, bench)
        record(op, "unfold+einsum", grouped_9x_unfold, [x, wt])
        record(op, "9 shifts (eager)", grouped_9x_shifts, [x, wt])
        record(op, "9 shifts (torch.compile)", compiled_shifts, [x, wt])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(dev), "rows": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
