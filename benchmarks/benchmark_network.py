"""Training-step and inference speed and peak memory of SA-UMamba's implementations next to nnU-Net's 2D U-Net.

Every row is measured in one run on one device with the same batch, so ratios are comparable. Rows:
  reference      our network on the released code's operations (the baseline for every speedup)
  released       the released code itself (its VMUNet in the configuration of its configs/config_setting.py), only
                 with --released-code DIR: DIR is a checkout of https://github.com/xiaomengxin123/SA-UMamba that you
                 provide (never downloaded); it needs mamba-ssm's CUDA kernel, timm and einops. It trains like the
                 reference, at full width also with --smoke; its parameters include modules it builds but never runs
                 (DySample, iAFF: 1.63 M); its speedup column is relative to the reference row, as every other row's
  fast/<scan>    our fast path with each available selective-scan backend, kernel by kernel
  fast+graphs    the fast path with the CUDA graphs our trainer records on one GPU and nnUNetv2_predict replays:
                 default scan, training steps and inference replayed as graphs
  fast+graphs/mamba-fwd  the same with mamba-ssm's scan forward instead of our sequential Triton forward (kernel
                 policy scan_forward="torch"; only when --models names it): what that forward saves
  fast+graphs/mamba-bwd  the same with mamba-ssm's scan backward everywhere (scan_backward="torch"; only when
                 --models names it): what our sequential Triton backward saves on short scans
  fast+compile   the fast path under torch.compile (only with --compile)
  nnunet_plain   nnU-Net's PlainConvUNet as nnU-Net plans it for 256x256 2D input (7 stages, 32..512)
A training step is forward + cross-entropy + backward + AdamW step (lr 1e-3, weight decay 1e-2, as the released code
trains; fp16 with a GradScaler, as nnU-Net trains; the fast path's trainer uses fused AdamW on CUDA, the other rows
torch's default AdamW, which on CUDA is the multi-tensor "foreach" one, as the released code trains);
inference is a no-grad forward in eval mode. cuDNN's autotuning is on as nnU-Net sets it, except for the training of
our fast rows, which run as our trainer trains (``autotunes_training``). Deep supervision is off for every network.
Peak memory is the largest allocated total during the timed training steps plus what CUDA-graph pools reserve beyond
it. "Host issue" is the time until a training step's Python call returns, before waiting for the GPU: close to the
step time, the host's kernel launches, not the GPU, set the pace.

    python benchmarks/benchmark_network.py                       # CUDA, batch 28 x 3 x 256 x 256 and 1 x 512 x 512
    python benchmarks/benchmark_network.py --smoke --json out.json   # tiny CPU run (used by the tests)
    python benchmarks/benchmark_network.py --released-code DIR --models reference released --shapes 28x3x256
                                                  # our reference row next to the released code (DIR: its checkout)
    python benchmarks/benchmark_network.py --cold-start --models fast+graphs --shapes 5x3x64 27x3x256 --dtypes fp16
                                                  # start-up of a training on a fresh machine: empty kernel caches
"""
from __future__ import annotations

import argparse
import gc
import importlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from nnunetv2_sa_umamba.architectures.sa_umamba import SAUMamba
from nnunetv2_sa_umamba.ops.compile_stats import CompileRecord, record_compilations
from nnunetv2_sa_umamba.ops.policy import kernel_policy
from nnunetv2_sa_umamba.ops.scan import available_backends
from nnunetv2_sa_umamba.training.cuda_graphs import enable_inference_graphs, enable_training_graphs, graphs_recorded
from nnunetv2_sa_umamba.training.nnUNetTrainerSAUMamba import adamw_fused
from nnunetv2_sa_umamba.training.precompile import precompile_training_step

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def nnunet_plain_unet(in_channels: int, num_classes: int, size: int) -> nn.Module:
    """As nnU-Net's planner builds it for square 2D inputs: pool down to 4x4 (7 stages at 256, 8 at 512)."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    n_stages = int(math.log2(size // 4)) + 1
    return PlainConvUNet(
        in_channels, n_stages, [min(32 * 2 ** i, 512) for i in range(n_stages)], nn.Conv2d, 3,
        [1] + [2] * (n_stages - 1), 2, num_classes, 2, conv_bias=True, norm_op=nn.InstanceNorm2d,
        norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True},
        deep_supervision=False)


@dataclass
class Row:
    shape: str
    dtype: str
    model: str
    params_m: float
    train_ms: float | None = None
    train_issue_ms: float | None = None
    infer_ms: float | None = None
    peak_train_gib: float | None = None
    note: str = ""


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_wall_and_issue_ms(fn, device: torch.device, warmup: int, iters: int) -> tuple[float, float]:
    """Medians of the time until ``fn``'s work is done and of the time until ``fn`` returns (the host has queued
    its kernels). An issue time close to the wall time means the host, not the GPU, sets the pace."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    walls, issues = [], []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        issues.append((time.perf_counter() - start) * 1e3)
        synchronize(device)
        walls.append((time.perf_counter() - start) * 1e3)
    return statistics.median(walls), statistics.median(issues)


def median_ms(fn, device: torch.device, warmup: int, iters: int) -> float:
    return _median_wall_and_issue_ms(fn, device, warmup, iters)[0]


def kernel_benchmark_mode(parser: argparse.ArgumentParser, args: argparse.Namespace, what: str) -> None:
    """For the kernel benchmarks (benchmark_scan.py, benchmark_rfaconv.py): without a GPU only ``--smoke`` runs (tiny
    shapes in Triton's CPU interpreter, one call each); else a parser error naming ``what`` is timed. ``--smoke``
    needs the interpreter on before Triton was imported: the scripts set it when --smoke is on their command line."""
    if not args.smoke and not torch.cuda.is_available():
        parser.error(f"no CUDA GPU: {what} timed on the GPU; --smoke runs tiny shapes on the CPU in Triton's "
                     f"interpreter")
    if args.smoke and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("--smoke runs Triton's interpreter: pass --smoke on the command line, or set "
                     "TRITON_INTERPRET=1 before Triton is imported")
    if args.smoke:
        args.batch, args.warmup, args.iters = 1, 0, 1


def _graph_pool_idle_bytes(device: torch.device) -> int:
    """Memory that CUDA-graph pools hold without a live tensor in it: reserved for the graphs' replays (their
    intermediate tensors) and unavailable to anything else, but not counted by max_memory_allocated."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return sum(segment["total_size"] - segment["allocated_size"] for segment in torch.cuda.memory_snapshot()
               if segment.get("device", index) == index and tuple(segment["segment_pool_id"]) != (0, 0))


def _autocast(device: torch.device, dtype_name: str):
    dtype = DTYPES[dtype_name]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def trains_as_our_trainer(model_name: str) -> bool:
    """Rows of our fast path train as nnUNetTrainerSAUMamba does; the others as the released code and nnU-Net."""
    return model_name.startswith("fast")


def uses_fused_optimizer(model_name: str) -> bool:
    """Each row trains with its trainer's optimizer: fused AdamW for the fast path (on CUDA), torch's default
    AdamW for the reference (the released code's) and nnU-Net's U-Net."""
    return trains_as_our_trainer(model_name)


def adamw(model: nn.Module, fused: bool, device: torch.device) -> torch.optim.AdamW:
    """The released code's AdamW (lr 1e-3, weight decay 1e-2); ``fused``: torch's fused kernel on CUDA, else
    torch's default implementation, as the trainer chooses."""
    return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2, fused=adamw_fused(fused, device))


def uses_precompile(model_name: str, disabled: bool) -> bool:
    """Rows on our fast path compile their Triton kernels ahead, in parallel, before the first step (as the
    trainer does); the others run no Triton kernel of ours."""
    return trains_as_our_trainer(model_name) and not disabled


def autotunes_training(model_name: str, disabled: bool) -> bool:
    """Whether a row trains with cuDNN's autotuning: nnU-Net's U-Net, the released code and our reference as they
    run (nnU-Net turns it on for a training), our fast path as our trainer trains it (off: it cost seconds at the
    first step and gained nothing per step; nnUNetTrainerSAUMamba.cudnn_autotune). Inference rows always run
    with it, as nnUNetv2_predict does; ``disabled`` (--no-cudnn-benchmark) turns it off everywhere."""
    return not disabled and not trains_as_our_trainer(model_name)


@contextmanager
def cudnn_autotuning(enabled: bool) -> Iterator[None]:
    """cuDNN's autotuning (``cudnn.benchmark``) on or off inside the block."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def training_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor, dtype_name: str,
                  fused_optimizer: bool = False):
    """A function running one training step: forward, cross-entropy, backward, AdamW step (``adamw``; with a
    GradScaler under fp16, as nnU-Net trains)."""
    device = x.device
    autocast = _autocast(device, dtype_name)
    optimizer = adamw(model, fused_optimizer, device)
    scaler = torch.amp.GradScaler(device.type, enabled=DTYPES[dtype_name] is torch.float16)
    loss_fn = nn.CrossEntropyLoss()

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = loss_fn(model(x), target)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return train_step


def measure(model: nn.Module, x: torch.Tensor, target: torch.Tensor, dtype_name: str, warmup: int,
            iters: int, fused_optimizer: bool = False, train_autotune: bool = True
            ) -> tuple[float, float, float, float | None]:
    """(train step ms, its host issue ms, inference ms, peak training GiB or None off CUDA); training with cuDNN's
    autotuning only with ``train_autotune``, inference as the caller set it."""
    device = x.device
    autocast = _autocast(device, dtype_name)
    train_step = training_step(model, x, target, dtype_name, fused_optimizer)

    def infer():
        with torch.no_grad(), autocast:
            model(x)

    model.train()
    with cudnn_autotuning(train_autotune and torch.backends.cudnn.benchmark):
        for _ in range(warmup):
            train_step()
        if device.type == "cuda":
            # after warm-up, so that cuDNN's autotuning workspace is not counted
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        train_ms, train_issue_ms = _median_wall_and_issue_ms(train_step, device, 0, iters)
    peak = None
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) + _graph_pool_idle_bytes(device)) / 2 ** 30
    model.eval()
    infer_ms = median_ms(infer, device, warmup, iters)
    return train_ms, train_issue_ms, infer_ms, peak


PROFILED_STEPS = 2  # training steps per profile; its kernel table is per step
KERNEL_ROWS = 60  # kernel names listed per profile


def kernel_time_table(events, steps: int, rows: int = KERNEL_ROWS) -> str:
    """GPU kernels of ``steps`` profiled training steps grouped by name, as a Markdown table per step: launches,
    ms, share of all kernel time, largest first, with the total first. ``events``: torch.profiler's events."""
    totals: dict[str, list[float]] = {}
    for event in events:
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        launches_and_us = totals.setdefault(event.name, [0, 0.0])
        launches_and_us[0] += 1
        launches_and_us[1] += event.device_time_total
    all_us = sum(us for _, us in totals.values())
    lines = ["| kernel | launches per step | ms per step | share |", "|---|---|---|---|",
             f"| all kernels | {sum(n for n, _ in totals.values()) / steps:.0f} | {all_us / steps / 1e3:.2f} | 100 % |"]
    for name, (launches, us) in sorted(totals.items(), key=lambda item: -item[1][1])[:rows]:
        short = name if len(name) <= 120 else name[:117] + "..."
        lines.append(f"| `{short.replace('|', '/')}` | {launches / steps:.0f} | {us / steps / 1e3:.3f} | "
                     f"{100 * us / all_us:.1f} % |")
    return "\n".join(lines)


def profile_training_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor, dtype_name: str,
                          path: Path, title: str, fused_optimizer: bool) -> None:
    """Append torch.profiler's top operators of PROFILED_STEPS training steps (after one unprofiled step) to ``path``
    and, on CUDA, every kernel grouped by name per step (``kernel_time_table``)."""
    from torch.profiler import ProfilerActivity, profile
    cuda = x.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    model.train()
    train_step = training_step(model, x, target, dtype_name, fused_optimizer)
    train_step()  # the optimizer's state is created outside the profile
    synchronize(x.device)
    with profile(activities=activities) as prof:
        for _ in range(PROFILED_STEPS):
            train_step()
        synchronize(x.device)
    sort_by = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    with open(path, "a") as f:
        f.write(f"\n## {title}\n{prof.key_averages().table(sort_by=sort_by, row_limit=30)}\n")
        if cuda:
            f.write(f"\nKernels per training step:\n\n{kernel_time_table(prof.events(), PROFILED_STEPS)}\n")


def scan_backends(device: torch.device) -> list[str]:
    # the GPU kernels only (Triton's CPU interpreter is far too slow to time)
    return [b for b in available_backends()
            if b != "reference" and (b not in ("cuda", "triton") or device.type == "cuda")]


RELEASED_REPOSITORY = "https://github.com/xiaomengxin123/SA-UMamba"
RELEASED_MODULE = "models.vmunet.vmunet"
# the released code's configs/config_setting.py (its VMUNet defaults are other depths); no checkpoint is loaded
RELEASED_CONFIG = dict(depths=[2, 2, 2, 2], depths_decoder=[2, 2, 2, 1], drop_path_rate=0.2)


class ReleasedCodeError(Exception):
    pass


def released_vmunet(code_dir: Path) -> type[nn.Module]:
    """The released code's VMUNet class from ``code_dir``/models/vmunet/vmunet.py. Its modules import each other as
    ``models.vmunet.*``, so ``code_dir`` is on sys.path while they load. Raises ReleasedCodeError naming the file
    and what to do when it is missing or does not import."""
    path = code_dir / Path(*RELEASED_MODULE.split(".")).with_suffix(".py")
    if not path.is_file():
        raise ReleasedCodeError(f"--released-code {code_dir}: {path} does not exist; pass the folder of a checkout "
                                f"of {RELEASED_REPOSITORY} (the folder that holds models/)")
    loaded = sys.modules.get(RELEASED_MODULE.split(".")[0])
    if loaded is not None and code_dir.resolve() not in (Path(p).resolve().parent
                                                         for p in getattr(loaded, "__path__", [])):
        raise ReleasedCodeError(f"--released-code {code_dir}: another package named 'models' is already imported "
                                f"({loaded}); run the benchmark from another folder")
    sys.path.insert(0, str(code_dir))
    try:
        module = importlib.import_module(RELEASED_MODULE)
    except Exception as err:  # whatever the released code raises while it loads
        raise ReleasedCodeError(f"--released-code {code_dir}: importing VMUNet from {path} failed with "
                                f"{type(err).__name__}: {err}. The released code needs mamba-ssm with its CUDA kernel "
                                f"(mamba_ssm.ops.selective_scan_interface), timm and einops, and every file of its "
                                f"models/vmunet/ folder") from err
    finally:
        sys.path.remove(str(code_dir))
    if not hasattr(module, "VMUNet"):
        raise ReleasedCodeError(f"--released-code {code_dir}: {path} defines no VMUNet; pass a checkout of "
                                f"{RELEASED_REPOSITORY}")
    return module.VMUNet


def released_network(vmunet: type[nn.Module], in_channels: int, classes: int) -> nn.Module:
    """The released network as its training scripts build it; for 1-channel images it is built for 3 channels
    and repeats the image, as the released code trains Synapse."""
    return vmunet(input_channels=3 if in_channels == 1 else in_channels, num_classes=classes, **RELEASED_CONFIG)


MAMBA_FORWARD_ROW = "fast+graphs/mamba-fwd"
MAMBA_BACKWARD_ROW = "fast+graphs/mamba-bwd"
# rows built only when --models names them: the trainer's path with one of our scan kernels replaced by mamba-ssm's
MAMBA_ROWS = {MAMBA_FORWARD_ROW: dict(scan_forward="torch"), MAMBA_BACKWARD_ROW: dict(scan_backward="torch")}


def model_specs(args, in_channels: int, classes: int, size: int, device: torch.device):
    """(name, builder) for every row on this device."""
    arch = dict(dims=(24, 48, 96, 192)) if args.smoke else {}
    specs = [("reference", lambda: SAUMamba(in_channels, classes, kernels=kernel_policy("reference"), **arch))]
    if args.released_vmunet is not None:
        specs.append(("released", lambda: released_network(args.released_vmunet, in_channels, classes)))
    for backend in scan_backends(device):
        specs.append((f"fast/{backend}", lambda b=backend: SAUMamba(in_channels, classes,
                                                                     kernels=kernel_policy("fast", scan=b), **arch)))
    if device.type == "cuda":
        specs.append(("fast+graphs", lambda: enable_inference_graphs(
            enable_training_graphs(SAUMamba(in_channels, classes, **arch)))))
        for row, choice in MAMBA_ROWS.items():
            if args.models and row in args.models:
                specs.append((row, lambda choice=choice: enable_inference_graphs(enable_training_graphs(
                    SAUMamba(in_channels, classes, kernels=kernel_policy(**choice), **arch)))))
    if args.compile:
        specs.append(("fast+compile", lambda: torch.compile(SAUMamba(in_channels, classes, **arch))))
    specs.append(("nnunet_plain", lambda: nnunet_plain_unet(in_channels, classes, size)))
    return [spec for spec in specs if not args.models or spec[0] in args.models]


def run(args) -> list[Row]:
    device = torch.device(args.device)
    rows = []
    for shape in args.shapes:
        batch, channels, size = shape
        x = torch.randn(batch, channels, size, size, device=device)
        target = torch.randint(0, args.classes, (batch, size, size), device=device)
        for dtype_name in args.dtypes:
            for name, build in model_specs(args, channels, args.classes, size, device):
                torch.manual_seed(0)
                model = build().to(device)
                params = sum(p.numel() for p in model.parameters()) / 1e6
                row = Row(f"{batch}x{channels}x{size}x{size}", dtype_name, name, round(params, 2))
                try:
                    autotune = autotunes_training(name, args.no_cudnn_benchmark)
                    if uses_precompile(name, args.no_precompile):
                        with cudnn_autotuning(autotune):  # as the trainer: not timed either way
                            precompile_training_step(model, x, DTYPES[dtype_name])
                    fused = uses_fused_optimizer(name)
                    row.train_ms, row.train_issue_ms, row.infer_ms, row.peak_train_gib = measure(
                        model, x, target, dtype_name, args.warmup, args.iters, fused, autotune)
                    if args.profile:
                        profile_training_step(model, x, target, dtype_name, args.profile, str(row), fused)
                    if name.startswith("fast+graphs"):
                        missing = [kind for kind in ("training", "inference") if not graphs_recorded(model, kind)]
                        if missing:
                            row.note = f"{' and '.join(missing)} CUDA graphs not recorded: ran kernel by kernel"
                except torch.OutOfMemoryError:
                    row.note = "out of memory"
                del model
                # a graphed model's forward refers back to it: collect the cycle, so that its graph pool is freed
                # before the next row measures memory
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                rows.append(row)
                print(format_row(row, rows), flush=True)
    return rows


@dataclass
class ColdStart:
    shape: str
    dtype: str
    model: str
    kernel_cache: str
    process_s: float | None = None
    build_s: float | None = None
    precompile_s: float | None = None
    first_step_s: float | None = None
    next_steps_s: float | None = None
    steady_ms: float | None = None
    kernels_compiled: int | None = None
    compile_s: float | None = None
    compiles_per_kernel: dict | None = None  # CompileRecord.summary()'s per_kernel, in --json
    note: str = ""

    @property
    def first_iteration_s(self) -> float | None:
        """From a built network to the end of its first training step: the parallel pre-compile and the step."""
        if self.first_step_s is None:
            return None
        return self.first_step_s + (self.precompile_s or 0.0)


def _cold_start_child(args) -> dict:
    """Run in a fresh process: the network built and moved to the device (the CUDA context included), then its
    first training steps one by one, then the median of steady steps."""
    started = time.perf_counter()
    device = torch.device(args.device)
    (batch, channels, size), dtype_name = args.shapes[0], args.dtypes[0]
    build = dict(model_specs(args, channels, args.classes, size, device))[args.cold_start_child]
    torch.manual_seed(0)
    model = build().to(device).train()
    x = torch.randn(batch, channels, size, size, device=device)
    target = torch.randint(0, args.classes, (batch, size, size), device=device)
    synchronize(device)
    build_s = time.perf_counter() - started
    precompile_s = None
    autotune = autotunes_training(args.cold_start_child, args.no_cudnn_benchmark)
    with record_compilations() as compiles, cudnn_autotuning(autotune):  # the pre-compile's (threads) and the steps'
        if uses_precompile(args.cold_start_child, args.no_precompile):
            # as the trainer does before its first step
            start = time.perf_counter()
            precompile_training_step(model, x, DTYPES[dtype_name])
            synchronize(device)
            precompile_s = time.perf_counter() - start
        step = training_step(model, x, target, dtype_name,
                             fused_optimizer=uses_fused_optimizer(args.cold_start_child))
        seconds = []
        for _ in range(args.cold_start_steps):
            start = time.perf_counter()
            step()
            synchronize(device)
            seconds.append(time.perf_counter() - start)
        steady_ms = median_ms(step, device, 0, args.iters)
    compiled = CompileRecord(compiles.observable, compiles.compiled)  # the compiles, not the on-disk cache's loads
    return {"build_s": build_s, "precompile_s": precompile_s, "first_step_s": seconds[0],
            "next_steps_s": sum(seconds[1:]), "steady_ms": steady_ms,
            "kernels_compiled": len(compiled.compilations) if compiled.observable else None,
            "compile_s": compiled.seconds if compiled.observable else None,
            "compiles_per_kernel": compiled.summary()["per_kernel"] if compiled.observable else None}


def cold_start(args) -> list[ColdStart]:
    """Each model's start in a new Python process with empty kernel caches (Triton's and Inductor's, in a
    temporary folder), or with the caches in ``--kernel-cache`` (a second run there shows their reuse)."""
    device = torch.device(args.device)
    rows = []
    for batch, channels, size in args.shapes:
        names = [name for name, _ in model_specs(args, channels, args.classes, size, device)]
        for dtype_name in args.dtypes:
            for name in names:
                with tempfile.TemporaryDirectory() as empty:
                    cache = args.kernel_cache or Path(empty)
                    env = os.environ | {"TRITON_CACHE_DIR": str(cache / "triton"),
                                        "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor")}
                    argv = [sys.executable, str(Path(__file__).resolve()), "--cold-start-child", name,
                            "--device", args.device, "--shapes", f"{batch}x{channels}x{size}", "--dtypes", dtype_name,
                            "--classes", str(args.classes), "--iters", str(args.iters),
                            "--cold-start-steps", str(args.cold_start_steps)]
                    argv += (["--smoke"] * args.smoke + ["--no-cudnn-benchmark"] * args.no_cudnn_benchmark
                             + ["--no-precompile"] * args.no_precompile)
                    if args.released_code is not None:
                        argv += ["--released-code", str(args.released_code)]
                    start = time.perf_counter()
                    child = subprocess.run(argv, env=env, capture_output=True, text=True)
                    row = ColdStart(f"{batch}x{channels}x{size}x{size}", dtype_name, name,
                                    str(args.kernel_cache) if args.kernel_cache else "empty",
                                    process_s=time.perf_counter() - start)
                if child.returncode == 0:
                    for key, value in json.loads(child.stdout.strip().splitlines()[-1]).items():
                        setattr(row, key, value)
                else:
                    lines = child.stderr.strip().splitlines()
                    row.note = f"failed: {lines[-1] if lines else f'exit status {child.returncode}'}"
                rows.append(row)
                print(format_cold_start(row), flush=True)
    return rows


def _fmt(value: float | None, spec: str) -> str:
    return format(value, spec) if value is not None else "-"


def format_cold_start(row: ColdStart) -> str:
    compiles = (f"{row.kernels_compiled} in {row.compile_s:.1f} s" if row.kernels_compiled is not None
                and row.compile_s is not None else "-")
    return (f"| {row.shape} | {row.dtype} | {row.model} | {row.kernel_cache} | {_fmt(row.process_s, '.1f')} | "
            f"{_fmt(row.build_s, '.1f')} | {_fmt(row.precompile_s, '.2f')} | {_fmt(row.first_step_s, '.2f')} | "
            f"**{_fmt(row.first_iteration_s, '.1f')}** | {_fmt(row.next_steps_s, '.2f')} | "
            f"{_fmt(row.steady_ms, '.1f')} | {compiles} | {row.note} |")


COLD_START_HEADER = ("| input | precision | model | kernel cache | whole process (s) | network built (s) | "
                     "pre-compile (s) | first step (s) | first iteration (s) | next steps (s) | steady step (ms) | "
                     "Triton kernels compiled (compile time summed) | note |\n"
                     "|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def _reference_row(row: Row, rows: list[Row]) -> Row | None:
    return next((r for r in rows if r.shape == row.shape and r.dtype == row.dtype and r.model == "reference"), None)


def _ratio(base: float | None, value: float | None) -> str:
    return f"{base / value:.2f}x" if base and value else "-"


def format_row(row: Row, rows: list[Row]) -> str:
    ref = _reference_row(row, rows) or row
    memory_ratio = (f"{row.peak_train_gib / ref.peak_train_gib:.2f}"
                    if row.peak_train_gib and ref.peak_train_gib else "-")
    return (f"| {row.shape} | {row.dtype} | {row.model} | {row.params_m:.2f} | {_fmt(row.train_ms, '.1f')} | "
            f"{_fmt(row.train_issue_ms, '.1f')} | {_ratio(ref.train_ms, row.train_ms)} | {_fmt(row.infer_ms, '.1f')} | "
            f"{_ratio(ref.infer_ms, row.infer_ms)} | {_fmt(row.peak_train_gib, '.2f')} | {memory_ratio} | "
            f"{row.note} |")


HEADER = ("| input | precision | model | params (M) | train step (ms) | host issue of a step (ms) | "
          "train speedup vs reference | inference (ms) | inference speedup | peak train memory (GiB) | "
          "memory / reference | note |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", nargs="+", default=None,
                        help="BxCxS entries (square inputs), default 28x3x256 1x1x512 (CUDA)")
    parser.add_argument("--dtypes", nargs="+", default=None, choices=list(DTYPES))
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--compile", action="store_true", help="add a torch.compile row")
    parser.add_argument("--models", nargs="+", default=None,
                        help="only these rows (reference, released, fast/cuda, fast/triton, fast/torch, "
                             f"fast+graphs, {', '.join(MAMBA_ROWS)}, fast+compile, nnunet_plain)")
    parser.add_argument("--released-code", type=Path, default=None, metavar="DIR",
                        help=f"add a 'released' row: the released code's VMUNet, imported from "
                             f"DIR/models/vmunet/vmunet.py (DIR: your checkout of {RELEASED_REPOSITORY}; it needs "
                             f"mamba-ssm's CUDA kernel, timm and einops), trained like the reference row")
    parser.add_argument("--no-cudnn-benchmark", action="store_true",
                        help="cuDNN's autotuning (cudnn.benchmark) off for every row; without it, the reference, "
                             "released and nnunet_plain rows train with it as nnU-Net does, our fast rows without "
                             "it as our trainer does, and inference runs with it as nnUNetv2_predict does")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run: narrow network, 1x3x64, fp32, 1 iter")
    parser.add_argument("--cold-start", action="store_true",
                        help="instead of the speed table: each model's start in a new process with empty kernel "
                             "caches (building the network, its first steps, then a steady step)")
    parser.add_argument("--cold-start-steps", type=int, default=5, metavar="N",
                        help="with --cold-start: first steps timed one by one (default 5)")
    parser.add_argument("--kernel-cache", type=Path, default=None, metavar="DIR",
                        help="with --cold-start: keep Triton's and Inductor's caches in DIR instead of empty "
                             "temporary ones (run twice to see the caches reused)")
    parser.add_argument("--no-precompile", action="store_true",
                        help="let the first step compile each Triton kernel when it first runs, one after the other, "
                             "instead of compiling them all ahead in parallel (the trainer's way); changes only "
                             "--cold-start's figures")
    parser.add_argument("--cold-start-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    parser.add_argument("--profile", type=Path, default=None,
                        help="also write torch.profiler's top operators of two training steps per model here and, on "
                             "CUDA, every kernel grouped by name (launches and ms per step)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.shapes = args.shapes or ["1x3x64"]
        args.dtypes = args.dtypes or ["fp32"]
        args.warmup, args.iters = 0, 1
    args.shapes = [tuple(int(v) for v in s.split("x")) for s in (args.shapes or ["28x3x256", "1x1x512"])]
    args.dtypes = args.dtypes or (["fp32", "bf16", "fp16"] if args.device.startswith("cuda") else ["fp32"])
    if args.cold_start_steps < 1:
        parser.error("--cold-start-steps must be at least 1")
    if args.models and "released" in args.models and args.released_code is None:
        parser.error(f"--models released needs --released-code DIR (a checkout of {RELEASED_REPOSITORY})")
    args.released_vmunet = None
    if args.released_code is not None:
        try:
            args.released_vmunet = released_vmunet(args.released_code)
        except ReleasedCodeError as err:
            parser.error(str(err))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark
    if args.cold_start_child:
        print(json.dumps(_cold_start_child(args)))
        return 0
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device: {device_name} | torch {torch.__version__} | scan backends: {scan_backends(device)}")
    print(COLD_START_HEADER if args.cold_start else HEADER)
    rows = cold_start(args) if args.cold_start else run(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": device_name, "torch": torch.__version__,
                                         "rows": [asdict(r) for r in rows]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
