"""nnUNetTrainerSAUMamba: nnU-Net v2's trainer with the SA-UMamba network and the paper's AdamW recipe, made stable
at the batch sizes nnU-Net plans (learning rate scaled to the batch, warm-up, non-finite steps skipped).

Variants that change one thing each live in ``nnunetv2_sa_umamba.training.variants``.
"""
from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.collate_outputs import collate_outputs
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn
from torch._dynamo import OptimizedModule

from nnunetv2_sa_umamba.architectures.sa_umamba import SAUMamba
from nnunetv2_sa_umamba.ops.policy import FUSED_OPERATORS, KernelPolicy, kernel_policy
from nnunetv2_sa_umamba.ops.scan import resolve_backend
from nnunetv2_sa_umamba.training.cuda_graphs import (
    disable_inference_graphs,
    disable_training_graphs,
    enable_inference_graphs,
    enable_training_graphs,
)
from nnunetv2_sa_umamba.training.lr_schedule import WarmupDecayLRScheduler, batch_scaled_lr, warmup_epochs_for
from nnunetv2_sa_umamba.training.nonfinite import NonFiniteTrainingError, SkippedStepCounter
from nnunetv2_sa_umamba.training.precompile import precompile_training_step


def round_up_patch_size(patch_size, multiple: int) -> list[int]:
    """The network needs multiples of 32. Rounding up (not padding inside the network) means the extra
    pixels are real image context rather than zeros, and training and inference tiles stay identical."""
    return [int(math.ceil(p / multiple) * multiple) for p in patch_size]


class nnUNetTrainerSAUMamba(nnUNetTrainer):
    # Architecture switches read by build_network_architecture; variants override them.
    rfac: bool = True
    residual_scale: bool = True
    decoder_block: str = "vss"
    implementation: str = "fast"
    scan_backend: str | None = None  # None: SAUMAMBA_SCAN_BACKEND, else "auto" (ops/policy.py)
    fused_optimizer: bool = True  # torch's fused AdamW on CUDA
    cuda_graphs: bool = True  # training steps and prediction replayed as CUDA graphs (single GPU, not compiled)
    precompile_kernels: bool = True  # the first step's Triton kernels compiled ahead, in parallel (precompile.py)
    cudnn_autotune: bool = False  # keep nnU-Net's cuDNN autotuning while training (see on_train_start)
    scale_lr_to_batch: bool = True  # initial_lr * sqrt(batch / 32) (lr_schedule.py)
    warmup: bool = True  # linear warm-up over 5 % of the epochs (1-10)
    # nnU-Net's run-length attributes that a variant changes (num_epochs, num_iterations_per_epoch,
    # num_val_iterations_per_epoch, save_every); nnU-Net sets them in __init__, so they are applied there
    run_length: dict[str, int] = {}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        # a bad SAUMAMBA_* environment value fails here, not at the first forward inside nnU-Net's workers
        self.kernels = self.kernel_policy()
        patch_size = self.configuration_manager.patch_size
        if len(patch_size) != 2:
            raise RuntimeError(
                f"{self.__class__.__name__} is a 2D network but configuration '{configuration}' has a "
                f"{len(patch_size)}D patch {patch_size}. Train the '2d' configuration.")
        rounded = round_up_patch_size(patch_size, SAUMamba.size_multiple)
        if rounded != list(patch_size):
            # Stored in the plans that training saves next to the checkpoint, so that --val and
            # nnUNetv2_predict tile with the same patch size.
            self.configuration_manager.configuration["patch_size"] = rounded
            self.plans_manager.plans["configurations"][configuration]["patch_size"] = rounded
            self.print_to_log_file(f"Patch size {list(patch_size)} rounded up to {rounded} "
                                   f"(SA-UMamba needs multiples of {SAUMamba.size_multiple}).")
        self.initial_lr = 1e-3  # the paper's, for batch 32; scaled to the planned batch (lr_schedule.py)
        self.weight_decay = 1e-2
        self.min_lr = 1e-5
        self.lr_decay = "cosine"
        self.grad_clip_norm = 12.0  # nnU-Net's
        self.skipped_steps = SkippedStepCounter()
        self._kernels_precompiled = False
        self._cudnn_benchmark: bool | None = None  # nnU-Net's cuDNN autotuning setting, while training changes it
        for name, value in self.run_length.items():
            if not hasattr(self, name):
                raise AttributeError(f"{type(self).__name__}.run_length names {name!r}, which nnU-Net's trainer "
                                     "does not have")
            setattr(self, name, value)

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        # nnU-Net 2.7+ signature. A classmethod rather than nnU-Net's staticmethod so that each variant only
        # sets a class attribute; callers (the trainer and the predictor) call it the same way.
        network = SAUMamba(
            in_channels=num_input_channels, num_classes=num_output_channels, rfac=cls.rfac,
            residual_scale=cls.residual_scale, decoder_block=cls.decoder_block,
            deep_supervision=enable_deep_supervision, kernels=cls.kernel_policy(),
        )
        # The heads always exist (strict loading in the predictor); frozen when unused so that DDP does not
        # wait for their gradients.
        network.deep_supervision_heads.requires_grad_(enable_deep_supervision)
        if cls.cuda_graphs and not _compile_requested():
            # nnUNetv2_predict's tiles (eval mode, one shape) replay one graph; no effect off CUDA
            enable_inference_graphs(network)
        return network

    @classmethod
    def kernel_policy(cls) -> KernelPolicy:
        """The kernels this trainer's network runs: the class's choices, the environment for the rest."""
        return kernel_policy(cls.implementation, scan=cls.scan_backend)

    def initialize(self) -> None:
        super().initialize()
        self.print_to_log_file(self._network_summary())
        # the per-epoch validation runs kernel by kernel: an inference graph at the training batch size would keep
        # a second memory pool reserved beside the training graphs' for little gain
        disable_inference_graphs(self._plain_network())
        if self._use_cuda_graphs():
            enable_training_graphs(self.network)
            self.print_to_log_file("Training steps run as CUDA graphs (recorded at the first step; "
                                   "nnUNetTrainerSAUMambaNoCudaGraphs turns this off).")

    def _network_summary(self) -> str:
        network = self._plain_network()
        parameters = sum(p.numel() for name, p in network.named_parameters() if not name.startswith("deep_supervision"))
        kind = "SA-UMamba" if self.rfac or self.residual_scale else "VM-UNet"
        scan = resolve_backend(self.device, self.kernels.scan)
        fused = ("off (released code's operations)" if not self.kernels.fast else
                 ", ".join(f"{op} {getattr(self.kernels, op)}" for op in FUSED_OPERATORS))
        return (f"Network: {kind} ({type(network).__name__}, {self.decoder_block.upper()} decoder, "
                f"RFAC {'on' if self.rfac else 'off'}, residual scales {'on' if self.residual_scale else 'off'}), "
                f"{parameters:,} parameters without the deep-supervision heads, patch "
                f"{list(self.configuration_manager.patch_size)}, batch {self.batch_size}. The plans' "
                f"'architecture' entry (PlainConvUNet) is nnU-Net's and unused. Kernels: scan backend {scan} "
                f"({self.kernels.scan}), fused kernels: {fused}; CUDA graphs "
                f"{'on' if self._use_cuda_graphs() else 'off'}.")

    def on_train_start(self) -> None:
        # nnU-Net turns cuDNN's autotuning on for the whole run. Here it cost 4.5-5 s at the first training step and
        # gained nothing per step (H200, docs/BENCHMARKS.md): training picks convolution algorithms by cuDNN's
        # heuristics. The final validation and nnUNetv2_predict turn autotuning on again for themselves.
        self._cudnn_benchmark = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = self._cudnn_benchmark and self.cudnn_autotune
        if self._cudnn_benchmark and not self.cudnn_autotune:
            self.print_to_log_file("cuDNN's autotuning is off while training (it only delayed the first step); "
                                   "cudnn_autotune = True on a trainer subclass keeps it.")
        super().on_train_start()

    def on_train_end(self) -> None:
        # free the training graphs' reserved memory before the final validation
        disable_training_graphs(self.network)
        if self._cudnn_benchmark is not None:
            torch.backends.cudnn.benchmark = self._cudnn_benchmark
        super().on_train_end()

    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        # the final validation predicts tiles of one shape, as nnUNetv2_predict does: replay them as a graph
        if self._use_cuda_graphs():
            enable_inference_graphs(self._plain_network())
        try:
            super().perform_actual_validation(save_probabilities)
        finally:
            disable_inference_graphs(self._plain_network())

    def _plain_network(self) -> nn.Module:
        network = self.network.module if self.is_ddp else self.network
        return network._orig_mod if isinstance(network, OptimizedModule) else network

    def _use_cuda_graphs(self) -> bool:
        # DDP's gradient hooks and torch.compile's own graphs do not mix with make_graphed_callables
        return (self.cuda_graphs and self.device.type == "cuda" and not self.is_ddp
                and not isinstance(self.network, OptimizedModule))

    def _set_batch_size_and_oversample(self) -> None:
        if self.is_ddp:
            # nnU-Net's batch Dice all-gathers per-sample tensors, which needs the same batch on every rank:
            # with 5 on 2 GPUs (3 + 2) NCCL waits forever. Round the global batch up to a multiple of the ranks.
            world_size = dist.get_world_size()
            batch_size = self.configuration_manager.batch_size
            rounded = math.ceil(batch_size / world_size) * world_size
            if rounded != batch_size:
                self.configuration_manager.configuration["batch_size"] = rounded
                self.print_to_log_file(f"Global batch size {batch_size} rounded up to {rounded} so that each of the "
                                       f"{world_size} GPUs gets {rounded // world_size}.")
        super()._set_batch_size_and_oversample()

    def _get_deep_supervision_scales(self):
        if not self.enable_deep_supervision:
            return None
        return [[scale, scale] for scale in SAUMamba.output_scales()]

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        self._plain_network().deep_supervision = enabled

    def learning_rate(self) -> float:
        """The peak learning rate: ``initial_lr`` scaled to the global (all-GPU) batch size."""
        if not self.scale_lr_to_batch:
            return self.initial_lr
        return batch_scaled_lr(self.initial_lr, self.configuration_manager.batch_size)

    def _lr_scheduler(self, optimizer: torch.optim.Optimizer, peak_lr: float) -> WarmupDecayLRScheduler:
        warmup = warmup_epochs_for(self.num_epochs) if self.warmup else 0
        scaled = (f" ({self.initial_lr:g} scaled to batch {self.configuration_manager.batch_size})"
                  if peak_lr != self.initial_lr else "")
        self.print_to_log_file(
            f"Learning rate: peak {peak_lr:.3g}{scaled}, "
            f"{f'linear warm-up over {warmup} epoch(s)' if warmup else 'no warm-up'}, {self.lr_decay} "
            f"decay over {self.num_epochs} epochs; steps with a non-finite loss or gradient are skipped.")
        return WarmupDecayLRScheduler(optimizer, peak_lr, self.num_epochs, warmup, self.lr_decay, self.min_lr)

    def configure_optimizers(self):
        peak_lr = self.learning_rate()
        optimizer = torch.optim.AdamW(self.network.parameters(), lr=peak_lr, weight_decay=self.weight_decay,
                                      fused=adamw_fused(self.fused_optimizer, self.device))
        return optimizer, self._lr_scheduler(optimizer, peak_lr)

    def train_step(self, batch: dict) -> dict:
        """nnU-Net's step (autocast, GradScaler, clipping at norm 12) that skips and counts steps whose loss or
        gradient is not finite instead of applying them; too many in a row stop training with a message."""
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = ([t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list)
                  else target.to(self.device, non_blocking=True))
        self._precompile_kernels(data)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type) if self.device.type == "cuda" else nullcontext():
            output = self.network(data)
            loss = self.loss(output, target)
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.grad_clip_norm)
            self.grad_scaler.step(self.optimizer)  # skips the update by itself when a gradient is not finite
            self.grad_scaler.update()
            loss_value, grad_norm_value = _to_host(loss, grad_norm)
        else:
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.grad_clip_norm)
            loss_value, grad_norm_value = _to_host(loss, grad_norm)
            if math.isfinite(loss_value) and math.isfinite(grad_norm_value):
                self.optimizer.step()
        if self.skipped_steps.record(loss_value, grad_norm_value):
            if not math.isfinite(loss_value):
                _check_input_is_finite(batch, data)
            if self.skipped_steps.diverged:
                raise NonFiniteTrainingError(self.skipped_steps.divergence_message(self.current_epoch))
        return {"loss": np.array(loss_value)}

    def _precompile_kernels(self, data: torch.Tensor) -> None:
        """Before the first step: on a fresh machine that step would compile each of its Triton kernel variants (80-90)
        one after the other; a dry step names them and threads compile them in parallel."""
        if self._kernels_precompiled:
            return
        self._kernels_precompiled = True
        if not (self.precompile_kernels and self.kernels.fast and self.device.type == "cuda"):
            return
        start = time.perf_counter()
        # the forward's autocast dtype is train_step's (CUDA's default, float16)
        record = precompile_training_step(self._plain_network(), data, torch.get_autocast_dtype("cuda"))
        if record.compiled:
            self.print_to_log_file(f"Compiled {len(record.compiled)} Triton kernel variants ahead, in parallel, in "
                                   f"{time.perf_counter() - start:.1f} s (Triton's cache: TRITON_CACHE_DIR, by default "
                                   "~/.triton/cache; later runs reuse it).")

    def on_train_epoch_end(self, train_outputs: list[dict]) -> None:
        # nnU-Net's mean, over the steps that trained (a skipped step's loss is NaN or inf)
        losses = np.asarray(collate_outputs(train_outputs)["loss"], dtype=np.float64).ravel()
        if self.is_ddp:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, losses)
            losses = np.concatenate(gathered)
        finite = losses[np.isfinite(losses)]
        self.logger.log("train_losses", float(finite.mean()) if finite.size else float("nan"), self.current_epoch)
        summary = self.skipped_steps.epoch_summary(len(train_outputs))
        if summary:
            self.print_to_log_file(summary)

    def _do_i_compile(self) -> bool:
        # Off by default. The scan is a registered custom op, so compiling keeps one graph (tested in ops), but
        # compiling the whole network took over two minutes on an H100 without a measured speedup
        # (docs/BENCHMARKS.md). nnUNet_compile=1 turns it on, on CUDA only (nnU-Net's 2D CPU compile crashes).
        return _compile_requested() and self.device.type == "cuda"


def adamw_fused(requested: bool, device: torch.device) -> bool | None:
    """AdamW's ``fused`` argument: True (one kernel for all weights instead of foreach's many launches, same update)
    when requested on CUDA, else None, not False: an explicit False makes torch loop over the parameters one by one
    instead of its default multi-tensor update."""
    return True if requested and device.type == "cuda" else None


def _to_host(loss: torch.Tensor, grad_norm: torch.Tensor) -> tuple[float, float]:
    # one device-to-host copy per step, as nnU-Net's own loss.cpu()
    loss_value, grad_norm_value = torch.stack([loss.detach().float(), grad_norm.detach().float()]).cpu().tolist()
    return loss_value, grad_norm_value


def _check_input_is_finite(batch: dict, data: torch.Tensor) -> None:
    """A non-finite loss from non-finite input is a data problem that no learning rate fixes: say which cases."""
    finite = torch.isfinite(data.flatten(1)).all(dim=1).tolist()
    if all(finite):
        return
    keys = batch.get("keys", [f"sample {i}" for i in range(len(finite))])
    bad = [str(key) for key, ok in zip(keys, finite, strict=True) if not ok]
    raise ValueError(f"The training input of case(s) {', '.join(bad)} contains NaN or inf after nnU-Net's "
                     "preprocessing. Check these images in nnUNet_raw (e.g. with nnUNetv2_plan_and_preprocess "
                     "--verify_dataset_integrity), fix or remove them, and preprocess again.")


def _compile_requested() -> bool:
    return os.environ.get("nnUNet_compile", "").lower() in ("true", "1", "t")
