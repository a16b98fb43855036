"""The demo dataset, the demo runner, and the whole nnU-Net workflow through the real console scripts.

The end-to-end tests run ``saumamba_demo`` (plan and preprocess, train, predict, evaluate) on a tiny generated
dataset in a subprocess, then nnU-Net's own commands on its output: ``--val``, ``--c`` (resume),
``nnUNetv2_find_best_configuration`` and ``nnUNetv2_export_model_to_zip``.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nnunetv2_sa_umamba.demo import run as demo_run_module
from nnunetv2_sa_umamba.demo.dataset import DEMO_DATASET_ID, generate_demo_dataset, synthesize_case
from nnunetv2_sa_umamba.demo.run import (
    MARKER,
    DemoError,
    DemoLayout,
    baseline_dice,
    case_dice,
    nnunet_command,
    nnunet_environment,
    predict_command,
    prepare_output_folder,
    resolve_device,
    train_command,
    write_overlay,
)
from nnunetv2_sa_umamba.ext_trainers import trainer_dir

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TRAINER = "nnUNetTrainerSAUMamba_tiny"  # tests/trainers/saumamba_test_trainers.py
TEST_TRAINERS = Path(__file__).resolve().parent / "trainers"
NUM_TRAIN, NUM_TEST, IMAGE_SIZE = 5, 2, 32


# ---------------------------------------------------------------- dataset generator


def test_generated_dataset_is_nnunet_raw_format(tmp_path):
    folder = generate_demo_dataset(tmp_path, num_train=6, num_test=3, image_size=48, seed=3)
    assert folder.name == f"Dataset{DEMO_DATASET_ID}_SAUMambaDemo"
    dataset_json = json.loads((folder / "dataset.json").read_text())
    assert dataset_json["channel_names"] == {"0": "R", "1": "G", "2": "B"}
    assert dataset_json["labels"] == {"background": 0, "lesion": 1}
    assert dataset_json["numTraining"] == 6 and dataset_json["file_ending"] == ".png"

    for split, prefix, count in (("Tr", "case", 6), ("Ts", "test", 3)):
        images = sorted((folder / f"images{split}").iterdir())
        labels = sorted((folder / f"labels{split}").iterdir())
        assert [p.name for p in images] == [f"{prefix}_{i:03d}_0000.png" for i in range(count)]
        assert [p.name for p in labels] == [f"{prefix}_{i:03d}.png" for i in range(count)]
        for image_file, label_file in zip(images, labels, strict=True):
            image, label = Image.open(image_file), np.asarray(Image.open(label_file))
            assert image.mode == "RGB" and image.size == (48, 48)
            assert label.shape == (48, 48) and label.dtype == np.uint8
            assert set(np.unique(label)) <= {0, 1}


def test_generated_dataset_is_seeded_and_test_cases_are_distinct(tmp_path):
    first = generate_demo_dataset(tmp_path / "a", num_train=5, num_test=2, image_size=32, seed=1)
    again = generate_demo_dataset(tmp_path / "b", num_train=7, num_test=2, image_size=32, seed=1)
    other = generate_demo_dataset(tmp_path / "c", num_train=5, num_test=2, image_size=32, seed=2)
    name = "imagesTr/case_004_0000.png"
    # a case depends on the seed and its index only, not on how many cases there are
    assert (first / name).read_bytes() == (again / name).read_bytes()
    assert (first / name).read_bytes() != (other / name).read_bytes()
    assert (first / "imagesTr/case_000_0000.png").read_bytes() != (first / "imagesTs/test_000_0000.png").read_bytes()


def test_synthetic_cases_have_varied_lesions_and_texture():
    cases = [synthesize_case(np.random.default_rng([0, 0, i]), 64) for i in range(40)]
    lesion_fractions = np.array([label.mean() for _, label in cases])
    assert (lesion_fractions > 0).mean() > 0.7  # most images hold a lesion ...
    assert (lesion_fractions == 0).any()  # ... some none
    assert lesion_fractions.max() < 0.5
    for image, label in cases:
        background = image[label == 0].astype(float)
        assert background.std(axis=0).min() > 2  # textured and noisy, not flat
        if label.any():
            # lesions are darker than the surrounding skin, by a varying amount
            assert image[label == 1].mean() < background.mean()


def test_generator_rejects_too_few_cases(tmp_path):
    with pytest.raises(ValueError, match="num_train"):
        generate_demo_dataset(tmp_path, num_train=3)


# ---------------------------------------------------------------- runner pieces (no nnU-Net subprocess)


def test_demo_refuses_a_folder_that_is_not_a_demo_output(tmp_path, capsys):
    precious = tmp_path / "my_results"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    for extra in ([], ["--keep"]):
        assert demo_run_module.main(["-o", str(precious)] + extra) == 1
        error = capsys.readouterr().err
        assert "is not a demo output folder" in error and str(precious) in error
    assert [p.name for p in precious.iterdir()] == ["notes.txt"]
    assert (precious / "notes.txt").read_text() == "keep me"


def test_output_folder_is_reused_only_with_keep_and_the_same_options(tmp_path):
    root = tmp_path / "demo"
    params = {"num_train": 5, "num_test": 2, "image_size": 32, "seed": 0}
    assert prepare_output_folder(root, keep=False, params=params) is False
    assert json.loads((root / MARKER).read_text()) == params
    (root / "nnUNet_raw").mkdir()
    assert prepare_output_folder(root, keep=True, params=params) is True
    assert (root / "nnUNet_raw").is_dir()
    with pytest.raises(DemoError, match="without --keep"):
        prepare_output_folder(root, keep=True, params={**params, "seed": 1})
    # a demo folder re-run without --keep starts from scratch
    assert prepare_output_folder(root, keep=False, params={**params, "seed": 1}) is False
    assert not (root / "nnUNet_raw").exists()


def test_unreadable_marker_is_reported(tmp_path):
    (tmp_path / MARKER).write_text("{not json")
    with pytest.raises(DemoError, match="not valid JSON"):
        prepare_output_folder(tmp_path, keep=True, params={})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without a GPU")
def test_cuda_without_gpu_is_refused():
    assert resolve_device("auto") == "cpu"
    with pytest.raises(DemoError, match="no CUDA GPU"):
        resolve_device("cuda")


def test_environment_points_nnunet_inside_the_demo_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_raw", "/users/own/nnUNet_raw")
    monkeypatch.delenv("nnUNet_extTrainer", raising=False)
    env = nnunet_environment(DemoLayout(tmp_path, TRAINER), "cpu")
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        assert Path(env[name]).parent == tmp_path
    assert Path(env["nnUNet_extTrainer"], "saumamba_trainers.py").is_file()
    assert env["nnUNet_compile"] == "false"


def test_environment_keeps_the_users_trainer_folders_after_ours(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_extTrainer", os.pathsep.join([str(TEST_TRAINERS), trainer_dir(), "/users/more"]))
    env = nnunet_environment(DemoLayout(tmp_path, TRAINER), "cpu")
    assert env["nnUNet_extTrainer"].split(os.pathsep) == [trainer_dir(), str(TEST_TRAINERS), "/users/more"]


def test_console_scripts_are_found_next_to_python_then_on_path(tmp_path, monkeypatch):
    assert Path(nnunet_command("nnUNetv2_train")).parent == BIN
    # a Python whose folder has no nnU-Net scripts (e.g. PYTHONPATH installs): PATH decides
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python3"))
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "nnUNetv2_train").write_text("#!/bin/sh\n")
    (scripts / "nnUNetv2_train").chmod(0o755)
    monkeypatch.setenv("PATH", str(scripts))
    assert nnunet_command("nnUNetv2_train") == str(scripts / "nnUNetv2_train")
    with pytest.raises(DemoError, match="nnUNetv2_predict was found neither"):
        nnunet_command("nnUNetv2_predict")


def test_commands_follow_the_device_and_resume_state(tmp_path):
    layout = DemoLayout(tmp_path, TRAINER)
    assert "--disable_tta" in predict_command(layout, TRAINER, "cpu")
    assert "--disable_tta" not in predict_command(layout, TRAINER, "cuda")
    fresh, resumed = train_command(TRAINER, "cpu", resume=False), train_command(TRAINER, "cpu", resume=True)
    assert Path(fresh[0]).name == "nnUNetv2_train" and Path(fresh[0]).parent == BIN
    assert fresh[1:] == [str(DEMO_DATASET_ID), "2d", "0", "-tr", TRAINER, "-device", "cpu"]
    assert resumed == fresh + ["--c"]


def test_baseline_dice_follows_nnunet_conventions():
    truth = np.zeros((10, 10), dtype=bool)
    truth[2:5, 2:6] = True
    assert case_dice(truth, truth) == 1.0
    assert case_dice(truth, np.zeros_like(truth)) == 0.0
    assert math.isnan(case_dice(np.zeros_like(truth), np.zeros_like(truth)))
    assert case_dice(truth, np.ones_like(truth)) == pytest.approx(2 * 12 / (12 + 100))


def test_baseline_dice_averages_cases_like_nnunets_summary(tmp_path):
    truth = np.zeros((10, 10), dtype=np.uint8)
    truth[:5] = 1
    Image.fromarray(truth).save(tmp_path / "a.png")
    Image.fromarray(np.zeros_like(truth)).save(tmp_path / "b.png")
    baselines = baseline_dice([tmp_path / "a.png", tmp_path / "b.png"])
    # all background: case b (both empty) is NaN and left out; all lesion: case b is a false positive (0)
    assert baselines["all_background"] == 0.0
    assert baselines["all_foreground"] == pytest.approx((2 * 50 / (50 + 100) + 0) / 2)


def test_overlay_draws_both_contours(tmp_path):
    image = np.full((16, 16, 3), 128, dtype=np.uint8)
    truth = np.zeros((16, 16), dtype=bool)
    truth[4:12, 4:12] = True
    prediction = np.roll(truth, 2, axis=1)
    write_overlay(image, truth, prediction, tmp_path / "o.png", "caption", scale=4)
    overlay = np.asarray(Image.open(tmp_path / "o.png").convert("RGB"))
    assert overlay.shape[1] == 2 * 64 + 4 and overlay.shape[0] > 64
    right_panel = overlay[-64:, -64:].reshape(-1, 3)
    assert (right_panel == (0, 255, 0)).all(axis=1).any()
    assert (right_panel == (255, 0, 0)).all(axis=1).any()
    assert (overlay[-64:, :64] == 128).all()  # the left panel is the untouched image


# ---------------------------------------------------------------- end to end, through the console scripts


def _run(command: list[str], env: dict[str, str]) -> str:
    completed = subprocess.run([str(c) for c in command], env=env, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, (f"{' '.join(map(str, command))} failed ({completed.returncode}):\n"
                                       f"{completed.stdout[-4000:]}\n{completed.stderr[-4000:]}")
    return completed.stdout


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One tiny demo run: (layout, environment for nnU-Net's commands, console output)."""
    root = tmp_path_factory.mktemp("e2e") / "demo"
    layout = DemoLayout(root, TRAINER)
    # fewest worker processes: at this size starting them (each imports torch) costs more than it saves
    # the tiny trainer lives with the tests; the demo keeps it on nnUNet_extTrainer after ours
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("nnUNet_extTrainer", str(TEST_TRAINERS))
        env = nnunet_environment(layout, "cpu") | {"nnUNet_n_proc_DA": "1", "nnUNet_def_n_proc": "1"}
    # subprocesses import the checkout under test, whether or not it is the installed copy
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    output = _run([BIN / "saumamba_demo", "-o", root, "--trainer", TRAINER, "--num-train", NUM_TRAIN,
                   "--num-test", NUM_TEST, "--image-size", IMAGE_SIZE, "--device", "cpu"], env)
    yield layout, env, output
    shutil.rmtree(root)  # checkpoints, predictions and preprocessed data


def _finite_dice(summary_file: Path) -> float:
    dice = json.loads(summary_file.read_text())["foreground_mean"]["Dice"]
    assert math.isfinite(dice) and 0 <= dice <= 1
    return dice


@pytest.mark.slow
def test_demo_command_trains_predicts_and_evaluates(demo):
    layout, _, output = demo
    assert (layout.fold / "checkpoint_final.pth").is_file()
    assert (layout.fold / "progress.png").is_file()
    _finite_dice(layout.fold / "validation" / "summary.json")

    predictions = sorted(layout.predictions.glob("test_*.png"))
    assert [p.name for p in predictions] == [f"test_{i:03d}.png" for i in range(NUM_TEST)]
    for prediction in predictions:
        mask = np.asarray(Image.open(prediction))
        assert mask.shape == (IMAGE_SIZE, IMAGE_SIZE) and set(np.unique(mask)) <= {0, 1}

    test_dice = _finite_dice(layout.summary)
    assert len(json.loads(layout.summary.read_text())["metric_per_case"]) == NUM_TEST
    summary = json.loads(layout.demo_summary.read_text())
    assert summary["test_dice"] == test_dice and summary["baseline_dice"]["all_background"] == 0
    assert list(layout.overlays.glob("test_*.png"))
    assert "Mean test Dice" in output and str(layout.summary) in output


@pytest.mark.slow
def test_validation_only_rerun(demo):
    layout, env, _ = demo
    summary = layout.fold / "validation" / "summary.json"
    summary.unlink()
    _run([BIN / "nnUNetv2_train", DEMO_DATASET_ID, "2d", 0, "-tr", TRAINER, "-device", "cpu", "--val"], env)
    _finite_dice(summary)


def _load_checkpoint(path: Path) -> dict:
    # nnU-Net's checkpoints hold numpy scalars in their training log; allow exactly those
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    numpy_types = [multiarray.scalar, np.dtype, type(np.dtype(np.float32)), type(np.dtype(np.float64))]
    with torch.serialization.safe_globals(numpy_types):
        return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_resume_continues_an_interrupted_training(demo):
    layout, env, _ = demo
    # Recreate the state of a run stopped after epoch 0 of 2: only checkpoint_latest.pth, one epoch logged.
    final, latest = layout.fold / "checkpoint_final.pth", layout.fold / "checkpoint_latest.pth"
    checkpoint = _load_checkpoint(final)
    checkpoint["current_epoch"] = 1
    checkpoint["logging"] = {key: values[:1] for key, values in checkpoint["logging"].items()}
    torch.save(checkpoint, latest)
    final.unlink()
    logs_before = set(layout.fold.glob("training_log_*.txt"))

    _run([BIN / "nnUNetv2_train", DEMO_DATASET_ID, "2d", 0, "-tr", TRAINER, "-device", "cpu", "--c"], env)
    assert final.is_file() and not latest.exists()
    new_logs = set(layout.fold.glob("training_log_*.txt")) - logs_before
    assert len(new_logs) == 1
    log = new_logs.pop().read_text()
    # trained only the missing epoch
    assert re.search(r": Epoch 1\s*$", log, re.M) and not re.search(r": Epoch 0\s*$", log, re.M)
    resumed = _load_checkpoint(final)
    assert resumed["current_epoch"] == 2
    assert resumed["logging"]["train_losses"][0] == checkpoint["logging"]["train_losses"][0]
    assert len(resumed["logging"]["train_losses"]) == 2


@pytest.mark.slow
def test_find_best_configuration_and_export(demo, tmp_path):
    layout, env, _ = demo
    _run([BIN / "nnUNetv2_find_best_configuration", DEMO_DATASET_ID, "-c", "2d", "-tr", TRAINER, "-f", 0,
          "--disable_ensembling", "-np", 1], env)
    instructions = (layout.results / layout.dataset.name / "inference_instructions.txt").read_text()
    assert f"-tr {TRAINER}" in instructions

    archive = tmp_path / "model.zip"
    _run([BIN / "nnUNetv2_export_model_to_zip", "-d", DEMO_DATASET_ID, "-c", "2d", "-tr", TRAINER, "-f", 0,
          "-o", archive], env)
    with zipfile.ZipFile(archive) as opened:
        names = opened.namelist()
    archive.unlink()
    assert any(n.endswith(f"{layout.model.name}/fold_0/checkpoint_final.pth") for n in names)


@pytest.mark.slow
def test_epoch_pace_benchmark_times_the_trainers_own_loop(demo, tmp_path):
    layout, env, _ = demo
    result = tmp_path / "pace.json"
    _run([sys.executable, REPO / "benchmarks" / "benchmark_epoch.py", "-d", DEMO_DATASET_ID, "--trainers", TRAINER,
          "--da-workers", 0, 1, "--iterations", 2, "--warmup", 1, "--device", "cpu", "--json", result], env)
    rows = json.loads(result.read_text())["rows"]
    assert [row["da_workers"] for row in rows] == [0, 1]
    for row in rows:
        assert row["trainer"] == TRAINER and row["iterations"] == 2 and row["val_iterations"] == 1
        # scaled to the tiny trainer's epoch of 2 training and 1 validation iterations
        assert all(row[key] > 0 for key in ("data_only_s", "step_only_s", "training_s", "validation_s"))
        assert row["paced_by"] in ("network", "data loading", "both")
