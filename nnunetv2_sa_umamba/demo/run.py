"""``saumamba_demo``: the whole nnU-Net workflow with SA-UMamba on a generated dataset, in one command.

Steps: generate the demo dataset, ``nnUNetv2_plan_and_preprocess`` (2d), ``nnUNetv2_train`` (fold 0),
``nnUNetv2_predict`` on the held-out test images, ``nnUNetv2_evaluate_folder`` against their labels, overlay
PNGs, and a summary with the test Dice next to trivial baselines. nnU-Net's folders (nnUNet_raw,
nnUNet_preprocessed, nnUNet_results) are set inside the output folder for the subprocesses only, so the
user's own nnU-Net folders are never touched.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from nnunetv2_sa_umamba.demo.dataset import (
    DEMO_DATASET_ID,
    FILE_ENDING,
    LABELS,
    dataset_folder_name,
    generate_demo_dataset,
)
from nnunetv2_sa_umamba.ext_trainers import trainer_dir

MARKER = ".saumamba_demo.json"
DEFAULT_TRAINER = "nnUNetTrainerSAUMambaDemo"
CONFIGURATION = "2d"
FOLD = "0"
PLANS = "nnUNetPlans"
NUM_OVERLAYS = 4
OVERLAY_SCALE = 4
TRUTH_COLOUR, PREDICTION_COLOUR = (0, 255, 0), (255, 0, 0)


class DemoError(RuntimeError):
    """A failure with a message meant for the user (printed without a traceback)."""


class DemoLayout:
    """Every path the demo writes, all below ``root``."""

    def __init__(self, root: Path, trainer: str):
        self.root = root
        self.marker = root / MARKER
        self.raw = root / "nnUNet_raw"
        self.preprocessed = root / "nnUNet_preprocessed"
        self.results = root / "nnUNet_results"
        self.dataset = self.raw / dataset_folder_name(DEMO_DATASET_ID)
        self.plans = self.preprocessed / dataset_folder_name(DEMO_DATASET_ID) / f"{PLANS}.json"
        self.model = self.results / dataset_folder_name(DEMO_DATASET_ID) / f"{trainer}__{PLANS}__{CONFIGURATION}"
        self.fold = self.model / f"fold_{FOLD}"
        self.predictions = root / "test_predictions"
        self.summary = self.predictions / "summary.json"
        self.overlays = root / "overlays"
        self.logs = root / "logs"
        self.demo_summary = root / "demo_summary.json"


# everything the demo writes at the top of its folder (see DemoLayout); a rerun deletes these and nothing else
DEMO_ENTRIES = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "test_predictions", "overlays", "logs",
                "demo_summary.json")


def prepare_output_folder(root: Path, keep: bool, params: dict) -> bool:
    """Create or check the output folder; return True if an existing demo dataset can be reused.

    A folder is only ever cleared or reused if it carries the demo's marker file: anything else is refused.
    Clearing deletes what the demo writes (DEMO_ENTRIES) and leaves anything else in the folder alone.
    """
    marker = root / MARKER
    if root.exists() and not root.is_dir():
        raise DemoError(f"{root} exists and is not a folder. Choose another output folder with -o.")
    if root.is_dir() and any(root.iterdir()) and not marker.is_file():
        raise DemoError(f"{root} exists, is not empty and is not a demo output folder (it has no {MARKER}). "
                        f"Nothing was changed. Choose another folder with -o, or remove this one yourself.")
    if marker.is_file() and keep:
        try:
            previous = json.loads(marker.read_text())
        except json.JSONDecodeError as error:
            raise DemoError(f"{marker} is not valid JSON ({error}). Run without --keep to rebuild the demo "
                            f"folder.") from error
        if previous != params:
            raise DemoError(f"{root} holds a demo dataset made with {previous}, but this run asks for {params}. "
                            f"Run without --keep to regenerate it, or pass the same options.")
        return True
    if marker.is_file():
        previous_output = [root / name for name in DEMO_ENTRIES if (root / name).exists() or (root / name).is_symlink()]
        if previous_output:
            print(f"Removing the previous demo output in {root}: {', '.join(p.name for p in previous_output)} "
                  f"(pass --keep to reuse it).")
        for path in previous_output:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    root.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(params))
    return False


def nnunet_environment(layout: DemoLayout, device: str) -> dict[str, str]:
    """Environment for nnU-Net's subprocesses: its three folders inside the demo folder, our trainers (and after
    them any trainer folders ``nnUNet_extTrainer`` already names, so ``--trainer`` can pick the user's own)."""
    env = dict(os.environ)
    own_folders = [p for p in env.get("nnUNet_extTrainer", "").split(os.pathsep) if p and p != trainer_dir()]
    env.update(nnUNet_raw=str(layout.raw), nnUNet_preprocessed=str(layout.preprocessed),
               nnUNet_results=str(layout.results), nnUNet_extTrainer=os.pathsep.join([trainer_dir(), *own_folders]),
               PYTHONUNBUFFERED="1")
    # nnU-Net defaults to 8-12 worker processes; on a small machine they only compete with training.
    num_workers = str(min(os.cpu_count() or 1, 4))
    env.setdefault("nnUNet_def_n_proc", num_workers)
    if device == "cpu":
        env.setdefault("nnUNet_n_proc_DA", "1")
        env.setdefault("nnUNet_compile", "false")
        # augmentation workers stay single-threaded; train/predict set torch's threads themselves on CPU
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def nnunet_command(name: str) -> str:
    """The console script ``name``: next to this Python (the virtualenv's bin folder), else on PATH."""
    path = Path(sys.executable).parent / name
    if path.is_file():
        return str(path)
    found = shutil.which(name)
    if found is None:
        raise DemoError(f"{name} was found neither next to {sys.executable} nor on PATH. Install nnU-Net and this "
                        f"package into that environment: pip install -e . (from the repository root).")
    return found


def run_step(title: str, command: list[str], env: dict[str, str], log_file: Path) -> None:
    """Run ``command``, streaming its output to the console and to ``log_file``; raise DemoError if it fails."""
    print(f"$ {' '.join(command)}", flush=True)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "wb") as log, subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                                       stderr=subprocess.STDOUT) as process:
        # raw chunks rather than lines, so that progress bars (carriage returns) render as they do in a shell
        while chunk := process.stdout.read1(4096):
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
            log.write(chunk)
        returncode = process.wait()
    if returncode != 0:
        raise DemoError(f"Step '{title}' failed (exit code {returncode}). Its full output is in {log_file}.")


def read_mask(path: Path) -> np.ndarray:
    """(H, W) bool foreground mask of a label PNG."""
    return np.asarray(Image.open(path)) > 0


def case_dice(reference: np.ndarray, prediction: np.ndarray) -> float:
    """Foreground Dice as nnU-Net's evaluator computes it: NaN when both masks are empty."""
    # imported here, like torch below: both take seconds, and --help and refusals should be instant
    from nnunetv2.evaluation.evaluate_predictions import compute_tp_fp_fn_tn

    tp, fp, fn, _ = compute_tp_fp_fn_tn(reference, prediction)
    return float("nan") if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)


def baseline_dice(label_files: list[Path]) -> dict[str, float]:
    """Mean test Dice (NaN cases skipped, as in nnU-Net's summary) of predicting everything as background,
    and of predicting everything as lesion."""
    references = [read_mask(f) for f in label_files]
    return {
        "all_background": float(np.nanmean([case_dice(r, np.zeros_like(r)) for r in references])),
        "all_foreground": float(np.nanmean([case_dice(r, np.ones_like(r)) for r in references])),
    }


def _contour(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool: a two-pixel-wide inner boundary of ``mask``."""
    return mask & ~ndimage.binary_erosion(mask, iterations=2)


def write_overlay(image: np.ndarray, truth: np.ndarray, prediction: np.ndarray, path: Path, caption: str,
                  scale: int = OVERLAY_SCALE) -> None:
    """Write the image (H, W, 3) uint8 next to a copy with the true (green) and predicted (red) contours;
    masks (H, W) bool; everything enlarged ``scale`` times."""
    enlarge = np.ones((scale, scale), dtype=np.uint8)
    big_image = np.kron(image, enlarge[..., None])
    overlay = big_image.copy()
    overlay[_contour(np.kron(truth, enlarge).astype(bool))] = TRUTH_COLOUR
    overlay[_contour(np.kron(prediction, enlarge).astype(bool))] = PREDICTION_COLOUR
    panel = np.concatenate([big_image, np.full((big_image.shape[0], 4, 3), 255, np.uint8), overlay], axis=1)
    caption_height = 14
    canvas = Image.new("RGB", (panel.shape[1], panel.shape[0] + caption_height), "white")
    canvas.paste(Image.fromarray(panel), (0, caption_height))
    ImageDraw.Draw(canvas).text((2, 1), caption, fill="black")
    canvas.save(path)


def write_overlays(layout: DemoLayout, per_case_dice: dict[str, float], count: int = NUM_OVERLAYS) -> list[Path]:
    """Overlays of the first ``count`` test cases that contain a lesion."""
    layout.overlays.mkdir(exist_ok=True)
    written = []
    for label_file in sorted((layout.dataset / "labelsTs").glob(f"*{FILE_ENDING}")):
        if len(written) == count:
            break
        case = label_file.name[:-len(FILE_ENDING)]
        truth = read_mask(label_file)
        if not truth.any():
            continue
        image = np.asarray(Image.open(layout.dataset / "imagesTs" / f"{case}_0000{FILE_ENDING}").convert("RGB"))
        prediction = read_mask(layout.predictions / label_file.name)
        path = layout.overlays / f"{case}.png"
        write_overlay(image, truth, prediction, path,
                      f"{case}  Dice {per_case_dice.get(case, float('nan')):.3f}  (green: truth, red: prediction)")
        written.append(path)
    return written


def resolve_device(device: str) -> str:
    """"auto" -> "cuda" when torch sees a GPU, else "cpu"; "cuda" without a GPU is an error."""
    if device == "cpu":
        return device
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if device == "cuda":
        raise DemoError("--device cuda was given but torch sees no CUDA GPU. Use --device cpu (or auto).")
    return "cpu"


def _at_least(minimum: int, why: str):
    """argparse type: an integer >= minimum."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is less than {minimum} ({why})")
        return value
    return parse


def _trainer_name(text: str) -> str:
    if not text.isidentifier():
        raise argparse.ArgumentTypeError(f"{text!r} is not a trainer class name")
    return text


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="saumamba_demo",
        description="Generate a small lesion dataset, then plan, train SA-UMamba, predict and evaluate it with "
                    "nnU-Net's own commands. Everything is written below the output folder.")
    parser.add_argument("-o", "--output", default="demo_output", metavar="DIR",
                        help="output folder (default: ./demo_output)")
    parser.add_argument("--trainer", default=DEFAULT_TRAINER, type=_trainer_name, metavar="NAME",
                        help=f"nnU-Net trainer class (default: {DEFAULT_TRAINER}, a short schedule)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: cuda when a GPU is available, else cpu")
    # the same limits as generate_demo_dataset, checked before the output folder is touched
    parser.add_argument("--num-train", type=_at_least(5, "nnU-Net's 5-fold split needs 5 cases"), default=100,
                        metavar="N", help="training cases, at least 5 (default: 100)")
    parser.add_argument("--num-test", type=_at_least(1, "the test set needs a case"), default=20, metavar="N",
                        help="held-out test cases (default: 20)")
    parser.add_argument("--image-size", type=_at_least(16, "the demo generator's smallest image"), default=64,
                        metavar="N", help="image side in pixels, at least 16 (default: 64)")
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="dataset seed (default: 0)")
    parser.add_argument("--keep", action="store_true",
                        help="reuse an existing demo folder: keep its dataset and preprocessing, skip a finished "
                             "training and continue an interrupted one")
    return parser.parse_args(argv)


def plan_command(env: dict[str, str]) -> list[str]:
    workers = env["nnUNet_def_n_proc"]
    return [nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", str(DEMO_DATASET_ID), "-c", CONFIGURATION,
            "--verify_dataset_integrity", "-np", workers, "-npfp", workers]


def train_command(trainer: str, device: str, resume: bool) -> list[str]:
    return [nnunet_command("nnUNetv2_train"), str(DEMO_DATASET_ID), CONFIGURATION, FOLD, "-tr", trainer,
            "-device", device] + (["--c"] if resume else [])


def predict_command(layout: DemoLayout, trainer: str, device: str) -> list[str]:
    # Test-time mirroring runs the network 4 times per image: worth it on a GPU, not in a CPU demo.
    tta = [] if device == "cuda" else ["--disable_tta"]
    # one preprocessing and one export worker: for tiny images, more cost more to start than they save
    return [nnunet_command("nnUNetv2_predict"), "-i", str(layout.dataset / "imagesTs"), "-o", str(layout.predictions),
            "-d", str(DEMO_DATASET_ID), "-c", CONFIGURATION, "-f", FOLD, "-tr", trainer, "-device", device,
            "-npp", "1", "-nps", "1"] + tta


def evaluate_command(layout: DemoLayout, env: dict[str, str]) -> list[str]:
    return [nnunet_command("nnUNetv2_evaluate_folder"), str(layout.dataset / "labelsTs"), str(layout.predictions),
            "-djfile", str(layout.predictions / "dataset.json"), "-pfile", str(layout.predictions / "plans.json"),
            "-o", str(layout.summary), "-np", env["nnUNet_def_n_proc"]]


class _Steps:
    """Numbered step headers and per-step wall times."""

    def __init__(self, total: int):
        self.total, self.index, self.seconds = total, 0, {}

    def start(self, key: str, title: str) -> None:
        self.index += 1
        self.key, self.started = key, time.time()
        print(f"\n{'=' * 80}\n[{self.index}/{self.total}] {title}\n{'=' * 80}", flush=True)

    def done(self) -> None:
        self.seconds[self.key] = round(time.time() - self.started, 1)


def run_demo(args: argparse.Namespace) -> dict:
    """All steps; returns the summary that is also written to demo_summary.json."""
    started = time.time()
    root = Path(args.output).resolve()
    layout = DemoLayout(root, args.trainer)
    params = {"num_train": args.num_train, "num_test": args.num_test, "image_size": args.image_size,
              "seed": args.seed}
    device = resolve_device(args.device)  # every option is checked before the folder is touched
    reuse = prepare_output_folder(root, args.keep, params)
    env = nnunet_environment(layout, device)
    steps = _Steps(total=7)

    steps.start("dataset", "Generate the demo dataset")
    if reuse and (layout.dataset / "dataset.json").is_file():
        print(f"Reusing {layout.dataset}")
    else:
        generate_demo_dataset(layout.raw, args.num_train, args.num_test, args.image_size, args.seed)
        print(f"Wrote {args.num_train} training and {args.num_test} test cases to {layout.dataset}")
    steps.done()

    steps.start("plan_and_preprocess", f"Plan and preprocess (nnUNetv2_plan_and_preprocess, {CONFIGURATION})")
    if reuse and layout.plans.is_file() and (layout.plans.parent / f"{PLANS}_{CONFIGURATION}").is_dir():
        print(f"Reusing {layout.plans.parent}")
    else:
        run_step("plan and preprocess", plan_command(env), env, layout.logs / "2_plan_and_preprocess.log")
    steps.done()

    steps.start("train", f"Train {args.trainer}, fold {FOLD}, on {device} (nnUNetv2_train)")
    if reuse and (layout.fold / "checkpoint_final.pth").is_file():
        print(f"Training already finished: {layout.fold / 'checkpoint_final.pth'}")
    else:
        resume = reuse and any((layout.fold / f"checkpoint_{kind}.pth").is_file() for kind in ("latest", "best"))
        run_step("train", train_command(args.trainer, device, resume), env, layout.logs / "3_train.log")
    steps.done()

    steps.start("predict", "Predict the held-out test images (nnUNetv2_predict)")
    run_step("predict", predict_command(layout, args.trainer, device), env, layout.logs / "4_predict.log")
    steps.done()

    steps.start("evaluate", "Evaluate against the test labels (nnUNetv2_evaluate_folder)")
    run_step("evaluate", evaluate_command(layout, env), env, layout.logs / "5_evaluate.log")
    summary = json.loads(layout.summary.read_text())
    steps.done()

    steps.start("overlays", "Overlays of predicted and true contours")
    lesion = str(LABELS["lesion"])
    per_case = {Path(c["reference_file"]).name[:-len(FILE_ENDING)]: c["metrics"][lesion]["Dice"]
                for c in summary["metric_per_case"]}
    for path in write_overlays(layout, per_case):
        print(path)
    steps.done()

    steps.start("summary", "Summary")
    result = {
        "test_dice": summary["foreground_mean"]["Dice"],
        "baseline_dice": baseline_dice(sorted((layout.dataset / "labelsTs").glob(f"*{FILE_ENDING}"))),
        "num_test_cases": len(summary["metric_per_case"]),
        "trainer": args.trainer, "device": device,
        "seconds": {**steps.seconds, "total": round(time.time() - started, 1)},
        "paths": {"dataset": str(layout.dataset), "preprocessed": str(layout.plans.parent),
                  "model": str(layout.fold), "predictions": str(layout.predictions),
                  "evaluation": str(layout.summary), "overlays": str(layout.overlays), "logs": str(layout.logs)},
    }
    layout.demo_summary.write_text(json.dumps(result, indent=2))
    print_summary(result)
    return result


def print_summary(result: dict) -> None:
    for name, path in result["paths"].items():
        print(f"{name:>13}: {path}")
    print(f"\nMean test Dice over {result['num_test_cases']} held-out cases (nnU-Net's evaluation; images with "
          f"neither a lesion nor a prediction do not count): {result['test_dice']:.4f}")
    print(f"  for comparison, predicting all background: {result['baseline_dice']['all_background']:.4f}, "
          f"all lesion: {result['baseline_dice']['all_foreground']:.4f}")
    print(f"Total time: {result['seconds']['total']:.0f} s ({result['device']})")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run_demo(args)
    except DemoError as error:
        print(f"saumamba_demo: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
