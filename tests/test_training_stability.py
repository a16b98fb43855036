"""The recipe that keeps SA-UMamba's training stable: learning rate scaled to the batch, warm-up, and training steps
with a non-finite loss or gradient skipped (counted, logged, and fatal only when they persist)."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunetv2_sa_umamba.training.cuda_graphs import enable_training_graphs, graphs_recorded
from nnunetv2_sa_umamba.training.lr_schedule import WarmupDecayLRScheduler, batch_scaled_lr, warmup_epochs_for
from nnunetv2_sa_umamba.training.nnUNetTrainerSAUMamba import nnUNetTrainerSAUMamba
from nnunetv2_sa_umamba.training.nonfinite import NonFiniteTrainingError, SkippedStepCounter
from nnunetv2_sa_umamba.training.variants.optimizer import nnUNetTrainerSAUMambaSGD

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("batch, expected", [(3, 1e-3 * math.sqrt(3 / 32)), (8, 5e-4), (32, 1e-3), (64, 1e-3)])
def test_lr_is_scaled_by_the_square_root_of_the_batch_and_never_raised(batch, expected):
    assert batch_scaled_lr(1e-3, batch) == pytest.approx(expected)


def test_batch_scaled_lr_refuses_an_empty_batch():
    with pytest.raises(ValueError, match="batch_size"):
        batch_scaled_lr(1e-3, 0)


@pytest.mark.parametrize("epochs, warmup", [(1, 0), (2, 1), (14, 1), (50, 3), (300, 10), (1000, 10)])
def test_warmup_is_five_percent_of_the_run_between_one_and_ten_epochs(epochs, warmup):
    assert warmup_epochs_for(epochs) == warmup


def _lrs(scheduler, epochs):
    values = []
    for epoch in epochs:
        scheduler.step(epoch)
        values.append(scheduler.optimizer.param_groups[0]["lr"])
    return values


def _optimizer():
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)


def test_warmup_then_cosine_to_the_minimum():
    scheduler = WarmupDecayLRScheduler(_optimizer(), 1e-3, max_steps=100, warmup_steps=3, min_lr=1e-5)
    warmup = _lrs(scheduler, [0, 1, 2])
    assert warmup == pytest.approx([2.5e-4, 5e-4, 7.5e-4])
    peak, middle, end = _lrs(scheduler, [3, 3 + 97 // 2, 100])
    assert peak == pytest.approx(1e-3)
    assert middle == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 48 / 97)))
    assert end == pytest.approx(1e-5)


def test_poly_decay_after_warmup_and_resume_gives_the_same_rate():
    scheduler = WarmupDecayLRScheduler(_optimizer(), 1e-2, max_steps=20, warmup_steps=1, decay="poly")
    assert _lrs(scheduler, [0, 1, 20]) == pytest.approx([5e-3, 1e-2, 0.0])
    resumed = WarmupDecayLRScheduler(_optimizer(), 1e-2, max_steps=20, warmup_steps=1, decay="poly")
    assert _lrs(resumed, [11]) == _lrs(scheduler, [11]) == pytest.approx([1e-2 * (1 - 10 / 19) ** 0.9])


def test_scheduler_refuses_a_warmup_as_long_as_the_run():
    with pytest.raises(ValueError, match="warmup_steps"):
        WarmupDecayLRScheduler(_optimizer(), 1e-3, max_steps=5, warmup_steps=5)


def test_counter_counts_and_resets_and_only_consecutive_skips_are_fatal():
    counter = SkippedStepCounter(max_consecutive=3)
    assert not counter.record(0.5, 1.0)
    assert counter.record(float("nan"), float("nan"))
    assert counter.record(0.5, float("inf"))
    assert not counter.record(0.4, 2.0)  # a good step ends the streak
    assert counter.consecutive == 0 and not counter.diverged
    line = counter.epoch_summary(steps=4)
    assert "Skipped 2 of 4" in line and "1 with a non-finite loss, 1 with a non-finite gradient" in line
    assert counter.epoch_summary(steps=4) is None  # the epoch's counts were reset, the totals kept
    assert (counter.total_loss, counter.total_gradient) == (1, 1)
    for _ in range(3):
        counter.record(float("inf"), 1.0)
    assert counter.diverged and "last 3 steps" in counter.divergence_message(epoch=7)


# ------------------------------------------------------------------------------------------- the trainer's step

def _make_trainer(cls, tmp_path, monkeypatch, device="cpu"):
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / name).mkdir(exist_ok=True)
        monkeypatch.setenv(name, str(tmp_path / name))
    plans = json.loads((FIXTURES / "nnUNetPlans_2d.json").read_text())
    plans["continue_training"] = False
    dataset_json = json.loads((FIXTURES / "dataset_rgb.json").read_text())
    return cls(plans, "2d", 0, dataset_json, device=torch.device(device))


@pytest.fixture
def trainer(tmp_path, monkeypatch):
    trainer = _make_trainer(nnUNetTrainerSAUMamba, tmp_path, monkeypatch)
    _initialize_without_data(trainer)
    return trainer


def _initialize_without_data(trainer):
    # what nnU-Net's initialize() sets up for a training step, without a preprocessed dataset
    torch.manual_seed(0)
    trainer.network = type(trainer).build_network_architecture(
        trainer.plans_manager, trainer.configuration_manager, 3, trainer.label_manager.num_segmentation_heads,
        True).to(trainer.device)
    trainer.optimizer, trainer.lr_scheduler = trainer.configure_optimizers()
    trainer.loss = trainer._build_loss()


def _batch(batch_size=2, keys=("case_a", "case_b")):
    return {"data": torch.randn(batch_size, 3, 32, 32), "target": torch.zeros(batch_size, 1, 32, 32),
            "keys": list(keys)}


def _main_output_loss(scale=1.0):
    def loss(output, target):
        main = output[0] if isinstance(output, (list, tuple)) else output
        return scale * main.float().pow(2).mean()
    return loss


def _weights(trainer):
    return {name: p.detach().clone() for name, p in trainer.network.named_parameters()}


def _unchanged(trainer, before):
    return all(torch.equal(p, before[name]) for name, p in trainer.network.named_parameters())


def test_a_finite_step_trains_with_gradients_clipped_to_nnunets_norm(trainer):
    trainer.loss = _main_output_loss(scale=1e6)  # gradients far above the clipping norm
    before = _weights(trainer)
    out = trainer.train_step(_batch())
    assert np.isfinite(out["loss"]) and not _unchanged(trainer, before)
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainer.network.parameters()
                                                 if p.grad is not None]))
    assert trainer.grad_clip_norm == 12.0 and norm.item() == pytest.approx(12.0, rel=1e-4)
    assert trainer.skipped_steps.total_loss == trainer.skipped_steps.total_gradient == 0


def test_a_step_with_a_nan_loss_is_skipped_counted_and_logged(trainer, monkeypatch):
    trainer.loss = lambda output, target: _main_output_loss()(output, target) * float("nan")
    before = _weights(trainer)
    out = trainer.train_step(_batch())
    assert np.isnan(out["loss"]) and _unchanged(trainer, before)
    assert trainer.skipped_steps.total_loss == 1
    logged = []
    monkeypatch.setattr(trainer, "print_to_log_file", lambda *args, **kwargs: logged.append(" ".join(map(str, args))))
    trainer.on_train_epoch_end([out, {"loss": np.array(0.25)}, {"loss": np.array(0.75)}])
    assert trainer.logger.get_value("train_losses", step=-1) == pytest.approx(0.5)  # the mean of the trained steps
    assert any("Skipped 1 of 3 training steps" in line for line in logged)


def test_a_step_with_an_infinite_gradient_is_skipped(trainer):
    trainer.loss = _main_output_loss()
    parameter = next(trainer.network.parameters())
    parameter.register_hook(lambda grad: grad * float("inf"))
    before = _weights(trainer)
    out = trainer.train_step(_batch())
    assert np.isfinite(out["loss"]) and _unchanged(trainer, before)
    assert trainer.skipped_steps.total_gradient == 1


def test_persistent_nan_stops_training_with_a_message(trainer):
    trainer.loss = lambda output, target: _main_output_loss()(output, target) * float("nan")
    trainer.skipped_steps.max_consecutive = 3
    trainer.train_step(_batch())
    trainer.train_step(_batch())
    with pytest.raises(NonFiniteTrainingError, match="last 3 steps .* lower the learning rate"):
        trainer.train_step(_batch())
    assert all(torch.isfinite(p).all() for p in trainer.network.parameters())


def test_nan_in_the_input_names_the_cases(trainer):
    trainer.loss = _main_output_loss()
    batch = _batch(keys=("good_case", "broken_case"))
    batch["data"][1, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match=r"case\(s\) broken_case contains NaN or inf"):
        trainer.train_step(batch)


def test_paper_recipe_scaled_to_the_planned_batch(trainer):
    # the fixture plans batch 2: 1e-3 * sqrt(2 / 32); nnU-Net's 1000 epochs warm up for 10 (5 %, at most 10)
    peak = 1e-3 * math.sqrt(2 / 32)
    assert trainer.learning_rate() == pytest.approx(peak)
    optimizer, scheduler = trainer.optimizer, trainer.lr_scheduler
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.param_groups[0]["weight_decay"] == 1e-2
    assert _lrs(scheduler, [0, 10, trainer.num_epochs]) == pytest.approx([peak / 11, peak, 1e-5])


def test_sgd_variant_momentum_0_9_with_warmup_and_poly(tmp_path, monkeypatch):
    trainer = _make_trainer(nnUNetTrainerSAUMambaSGD, tmp_path, monkeypatch)
    trainer.num_epochs = 100
    _initialize_without_data(trainer)
    group = trainer.optimizer.param_groups[0]
    assert isinstance(trainer.optimizer, torch.optim.SGD)
    assert (group["momentum"], group["nesterov"], group["weight_decay"]) == (0.9, True, 1e-4)
    assert _lrs(trainer.lr_scheduler, [0, 5, 100]) == pytest.approx([1e-2 / 6, 1e-2, 0.0])


@pytest.mark.cuda
def test_nan_step_is_skipped_under_cuda_graphs_and_grad_scaler(tmp_path, monkeypatch):
    trainer = _make_trainer(nnUNetTrainerSAUMamba, tmp_path, monkeypatch, device="cuda")
    _initialize_without_data(trainer)
    enable_training_graphs(trainer.network)
    # nnU-Net's scaler starts at 2 ** 16, where the first fp16 steps overflow and are skipped by design
    trainer.grad_scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 8)
    finite_loss = _main_output_loss()
    trainer.loss = finite_loss
    before = _weights(trainer)
    assert np.isfinite(trainer.train_step(_batch())["loss"])
    assert graphs_recorded(trainer.network) == 1 and not _unchanged(trainer, before)

    trainer.loss = lambda output, target: finite_loss(output, target) * float("nan")
    before = _weights(trainer)
    assert np.isnan(trainer.train_step(_batch())["loss"])
    assert _unchanged(trainer, before) and trainer.skipped_steps.total_loss == 1

    trainer.loss = finite_loss  # the recorded graph goes on training after a skipped backward
    assert np.isfinite(trainer.train_step(_batch())["loss"]) and not _unchanged(trainer, before)
    assert graphs_recorded(trainer.network) == 1
    assert all(torch.isfinite(p).all() for p in trainer.network.parameters())


def test_paper_lr_variant_keeps_the_released_schedule(tmp_path, monkeypatch):
    from nnunetv2_sa_umamba.training.variants.optimizer import nnUNetTrainerSAUMambaPaperLR
    trainer = _make_trainer(nnUNetTrainerSAUMambaPaperLR, tmp_path, monkeypatch)
    trainer.num_epochs = 100
    _initialize_without_data(trainer)
    assert trainer.learning_rate() == 1e-3  # whatever the batch (the fixture plans 2)
    assert _lrs(trainer.lr_scheduler, [0, 100]) == pytest.approx([1e-3, 1e-5])
