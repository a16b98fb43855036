"""benchmarks/benchmark_accuracy.py: the generated run-length trainers and the reading of nnU-Net's training logs
(the end-to-end run needs a GPU and real data; its results are in docs/RESULTS.md)."""
import json
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def bench(benchmark_script):
    return benchmark_script("benchmark_accuracy")


def _log(lines):
    return "".join(f"2026-12-02 18:00:{i:02d}.000000: {line} \n" for i, line in enumerate(lines))


def test_training_logs_are_read_per_epoch_and_a_resumed_epoch_counts_once(bench, tmp_path):
    (tmp_path / "training_log_2026_12_2_18_00_00.txt").write_text(_log([
        "Learning rate: peak 0.000919", "", "Epoch 0", "train_loss -0.1", "Pseudo dice [np.float32(0.5)]",
        "Epoch time: 60.0 s", "Epoch 1", "train_loss nan",
        "Skipped 3 of 50 training steps: 2 with a non-finite loss, 1 with a non-finite gradient (...)",
        "Pseudo dice [np.float32(0.6), np.float32(0.8)]", "Epoch time: 10.0 s", "Epoch 2", "train_loss -0.3"]))
    # the run was stopped in epoch 2 and resumed from the checkpoint after epoch 1
    (tmp_path / "training_log_2026_12_2_18_30_00.txt").write_text(_log([
        "Epoch 2", "train_loss -0.4", "Pseudo dice [np.float32(0.9)]", "Epoch time: 12.0 s",
        "Epoch 3", "train_loss -0.5", "Pseudo dice [np.float32(0.85)]", "Epoch time: 14.0 s"]))
    result = bench.parse_training_logs(tmp_path)
    assert result["epochs_done"] == 4
    assert result["pseudo_dice_per_epoch"] == pytest.approx([0.5, 0.7, 0.9, 0.85])
    assert (result["final_pseudo_dice"], result["best_pseudo_dice"]) == (pytest.approx(0.85), pytest.approx(0.9))
    assert result["first_epoch_s"] == 60.0 and result["seconds_per_epoch"] == 12.0  # median after the first
    assert (result["skipped_loss_steps"], result["skipped_gradient_steps"], result["nan_loss_epochs"]) == (2, 1, 1)


def test_generated_trainers_set_the_run_length_and_batch_and_nnunet_finds_them(bench, tmp_path, monkeypatch):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from nnunetv2_sa_umamba.training.nnUNetTrainerSAUMamba import nnUNetTrainerSAUMamba

    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / name).mkdir()
        monkeypatch.setenv(name, str(tmp_path / name))
    bench.write_trainer_module(tmp_path / "trainers", ["nnUNetTrainer", "nnUNetTrainerSAUMamba"], epochs=50,
                               iterations=40, val_iterations=8, save_every=2, batch_size=3)
    name = bench.run_length_name("nnUNetTrainerSAUMamba", 50, 40, 3)
    assert name == "nnUNetTrainerSAUMamba__50x40_b3"
    # nnU-Net's own lookup, as nnUNetv2_train and nnUNetv2_predict run it
    monkeypatch.setenv("nnUNet_extTrainer", str(tmp_path / "trainers"))
    cls = recursive_find_trainer_class_by_name(name)
    assert issubclass(cls, nnUNetTrainerSAUMamba) and cls.__name__ == name
    assert recursive_find_trainer_class_by_name("nnUNetTrainer__50x40_b3").__name__ == "nnUNetTrainer__50x40_b3"
    plans = json.loads((FIXTURES / "nnUNetPlans_2d.json").read_text())
    plans["continue_training"] = False
    trainer = cls(plans, "2d", 0, json.loads((FIXTURES / "dataset_rgb.json").read_text()), device=torch.device("cpu"))
    assert (trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch,
            trainer.save_every) == (50, 40, 8, 2)
    assert trainer.configuration_manager.batch_size == 3
    assert trainer.learning_rate() == pytest.approx(1e-3 * (3 / 32) ** 0.5)


def test_markdown_row_shows_partial_runs_and_missing_test_metrics(bench):
    row = {"trainer": "nnUNetTrainerSAUMamba", "batch_size": 27, "epochs_done": 12, "epochs": 50, "iterations": 50,
           "seconds_per_epoch": 11.53, "first_epoch_s": 57.2, "final_pseudo_dice": 0.9, "best_pseudo_dice": 0.91,
           "skipped_loss_steps": 0, "skipped_gradient_steps": 1, "nan_loss_epochs": 0}
    line = bench.markdown_table([row]).splitlines()[2]
    assert line == "| nnUNetTrainerSAUMamba | 27 | 12/50 x 50 | 11.5 (57) | - | - | - | 0.9000 / 0.9100 | 0 / 1 | 0 |"


def test_stop_after_counts_from_the_command_start_and_stops_a_running_training(bench, tmp_path, monkeypatch, capsys):
    deadlines = []

    class Stop(Exception):
        pass

    def record(ws, names, fold, sequential, deadline, da_workers, device):
        deadlines.append(deadline)
        raise Stop

    real_train = bench.train
    monkeypatch.setattr(bench, "convert", lambda ws, source, extra: None)
    monkeypatch.setattr(bench, "plan_and_preprocess", lambda ws, processes: time.sleep(0.5))
    monkeypatch.setattr(bench, "train", record)
    started = time.monotonic()
    with pytest.raises(Stop):
        bench.main(["--dataset", "cvc", "--source", str(tmp_path), "--work", str(tmp_path / "work"),
                    "--trainers", "nnUNetTrainer", "--stop-after", "2"])
    # preprocessing's half second is inside the two minutes, not added to them
    assert started + 120 <= deadlines[0] < started + 120.4

    # a training still running at the deadline is stopped, and the call reports it unfinished
    fake_train = tmp_path / "nnUNetv2_train"
    fake_train.write_text("#!/bin/sh\nsleep 60\n")
    fake_train.chmod(0o755)
    monkeypatch.setattr(bench, "nnunet_command", lambda name: str(fake_train))
    ws = bench.Workspace(tmp_path / "work", bench.DATASETS["cvc"])
    ws.logs.mkdir(parents=True, exist_ok=True)
    monkeypatch.setattr(bench.time, "sleep", lambda seconds: None)  # the polling interval
    begun = time.monotonic()
    assert real_train(ws, ["nnUNetTrainer__1x1"], 0, False, time.monotonic() - 1, 1, "cpu") is False
    assert "stopping at the time limit" in capsys.readouterr().out
    assert time.monotonic() - begun < 30
