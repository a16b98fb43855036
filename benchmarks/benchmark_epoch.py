"""What sets the pace of an nnU-Net training epoch: the data pipeline or the network.

For each trainer, on a dataset that nnU-Net has planned and preprocessed, in one process on one device:

  data only     the epoch's batches drawn from the trainer's own training loader (nnU-Net's augmentation in
                ``nnUNet_n_proc_DA`` worker processes), nothing trained
  step only     the trainer's own ``train_step`` on one batch drawn from that loader, again and again (the host
                copy to the device included), with no data loading
  training      ``train_step(next(loader))``, as ``nnUNetv2_train``'s epoch loop runs it
  validation    ``validation_step(next(val_loader))`` for the trainer's validation iterations

Every figure is seconds per epoch of the trainer's iteration counts (``num_iterations_per_epoch`` and
``num_val_iterations_per_epoch``; 250 and 50 in nnU-Net), measured over ``--iterations`` steps and scaled. Training
close to "data only" means the loader sets the pace (more ``nnUNet_n_proc_DA`` workers help); close to "step only",
the network does. The first steps (``--warmup``: kernel compilation, cuDNN's autotuning, CUDA-graph recording) are
not timed; ``nnUNetv2_train``'s own "Epoch time" adds logging, checkpoints and, in its first epoch, those.

    nnUNet_preprocessed=... nnUNet_results=... python benchmarks/benchmark_epoch.py -d 201 \\
        --trainers nnUNetTrainer nnUNetTrainerSAUMamba --da-workers 12 6
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass
class EpochPace:
    trainer: str
    batch_size: int
    patch_size: str
    da_workers: int
    iterations: int
    val_iterations: int
    data_only_s: float
    step_only_s: float
    training_s: float
    validation_s: float

    @property
    def paced_by(self) -> str:
        # within 15 % of one bound and clearly above the other
        if self.training_s <= 1.15 * self.step_only_s and self.data_only_s < 0.9 * self.training_s:
            return "network"
        if self.training_s <= 1.15 * self.data_only_s and self.step_only_s < 0.9 * self.training_s:
            return "data loading"
        return "both"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(fn, count: int, device: torch.device) -> float:
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(count):
        fn()
    _synchronize(device)
    return time.perf_counter() - start


@contextmanager
def _da_workers(count: int):
    """nnU-Net reads nnUNet_n_proc_DA whenever it builds its loaders."""
    old = os.environ.get("nnUNet_n_proc_DA")
    os.environ["nnUNet_n_proc_DA"] = str(count)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("nnUNet_n_proc_DA")
        else:
            os.environ["nnUNet_n_proc_DA"] = old


def _drain(loader, count: int) -> None:
    for _ in range(count):
        next(loader)


def _shut_down(*loaders) -> None:
    for loader in loaders:
        finish = getattr(loader, "_finish", None)
        if finish is not None:
            finish()


def _time_one_loader_setting(trainer, train_loader, val_loader, iterations: int, val_iterations: int,
                             warmup: int, queued: int, device: torch.device) -> tuple[float, float, float, float]:
    """Seconds for (data only, step only, training, validation) over the given iteration counts. ``queued``: how many
    batches the loader's workers keep ready; they are drained before each timed loop that reads the loader, so that
    batches prepared while nothing was timed do not count as free."""
    _drain(train_loader, queued)
    data_only = _seconds(lambda: next(train_loader), iterations, device)
    batch = next(train_loader)
    for _ in range(warmup):
        trainer.train_step(batch)
    step_only = _seconds(lambda: trainer.train_step(batch), iterations, device)
    _drain(train_loader, queued)
    training = _seconds(lambda: trainer.train_step(next(train_loader)), iterations, device)
    trainer.network.eval()
    with torch.no_grad():
        validation = _seconds(lambda: trainer.validation_step(next(val_loader)), val_iterations, device)
    trainer.network.train()
    return data_only, step_only, training, validation


def measure_trainer(trainer_name: str, dataset: str, configuration: str, fold: int, device: torch.device,
                    da_workers: list[int], iterations: int, warmup: int) -> list[EpochPace]:
    """One row per number of data-augmentation workers; the trainer (and its compiled kernels) is built once."""
    from nnunetv2.run.run_training import get_trainer_from_args

    trainer = get_trainer_from_args(dataset, configuration, fold, trainer_name, device=device)
    trainer.initialize()
    trainer.network.train()
    per_epoch, per_val_epoch = trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch
    val_iterations = max(1, round(iterations * per_val_epoch / per_epoch))
    rows = []
    for workers in da_workers:
        with _da_workers(workers):
            train_loader, val_loader = trainer.get_dataloaders()
        try:
            # nnU-Net's queue length for its training loader
            seconds = _time_one_loader_setting(trainer, train_loader, val_loader, iterations, val_iterations,
                                               warmup if not rows else 0, max(6, workers // 2), device)
        finally:
            _shut_down(train_loader, val_loader)
        data_only, step_only, training, validation = seconds
        rows.append(EpochPace(
            trainer_name, trainer.batch_size, "x".join(map(str, trainer.configuration_manager.patch_size)), workers,
            iterations, val_iterations, data_only * per_epoch / iterations, step_only * per_epoch / iterations,
            training * per_epoch / iterations, validation * per_val_epoch / val_iterations))
        print(format_row(rows[-1]), flush=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


HEADER = ("| trainer | batch | patch | DA workers | data only (s/epoch) | step only (s/epoch) | training (s/epoch) | "
          "validation (s/epoch) | paced by |\n|---|---|---|---|---|---|---|---|---|")


def format_row(row: EpochPace) -> str:
    return (f"| {row.trainer} | {row.batch_size} | {row.patch_size} | {row.da_workers} | {row.data_only_s:.1f} | "
            f"{row.step_only_s:.1f} | {row.training_s:.1f} | {row.validation_s:.1f} | {row.paced_by} |")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", "--dataset", required=True, help="dataset name or id (planned and preprocessed)")
    parser.add_argument("-c", "--configuration", default="2d")
    parser.add_argument("-f", "--fold", type=int, default=0)
    parser.add_argument("--trainers", nargs="+", default=["nnUNetTrainer", "nnUNetTrainerSAUMamba"], metavar="NAME")
    parser.add_argument("--da-workers", nargs="+", type=int, default=None, metavar="N",
                        help="nnUNet_n_proc_DA values to try (default: nnU-Net's own choice on this machine)")
    parser.add_argument("--iterations", type=int, default=100,
                        help="timed training steps per figure, scaled to the trainer's epoch (default 100)")
    parser.add_argument("--warmup", type=int, default=10,
                        help="untimed first steps: compilation, autotuning, CUDA-graph recording (default 10)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    if args.iterations < 1 or args.warmup < 0:
        parser.error("--iterations must be at least 1 and --warmup at least 0")
    for name in ("nnUNet_preprocessed", "nnUNet_results"):
        if not os.environ.get(name):
            parser.error(f"set {name} (nnU-Net's folders) before running this benchmark")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

    device = torch.device(args.device)
    da_workers = args.da_workers or [get_allowed_n_proc_DA()]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name} | torch {torch.__version__} | {os.cpu_count()} CPU cores | "
          f"nnUNet_compile={os.environ.get('nnUNet_compile', '(unset)')}")
    print(HEADER, flush=True)
    rows = []
    for trainer_name in args.trainers:
        rows += measure_trainer(trainer_name, args.dataset, args.configuration, args.fold, device, da_workers,
                                args.iterations, args.warmup)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": name, "cpu_cores": os.cpu_count(),
                                         "rows": [asdict(r) | {"paced_by": r.paced_by} for r in rows]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
