"""nnUNetTrainerSAUMamba: nnU-Net v2's trainer with the SA-UMamba network and the paper's AdamW recipe.

Variants that change one thing each live in ``nnunetv2_sa_umamba.training.variants``.
"""
from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn
from torch._dynamo import OptimizedModule
from torch.optim.lr_scheduler import _LRScheduler

from nnunetv2_sa_umamba.architectures.sa_umamba import SAUMamba
from nnunetv2_sa_umamba.ops.policy import kernel_policy
from nnunetv2_sa_umamba.training.cuda_graphs import (disable_inference_graphs, disable_training_graphs,
                                                     enable_inference_graphs, enable_training_graphs)


class CosineToMinLRScheduler(_LRScheduler):
    """Cosine decay from ``initial_lr`` at step 0 to ``min_lr`` at ``max_steps``; ``step(epoch)`` like
    nnU-Net's PolyLRScheduler, so the value depends only on the epoch (resume-safe)."""

    def __init__(self, optimizer: torch.optim.Optimizer, initial_lr: float, max_steps: int,
                 min_lr: float = 1e-5):
        self.initial_lr, self.max_steps, self.min_lr = initial_lr, max_steps, min_lr
        self.ctr = 0
        super().__init__(optimizer, -1)

    def lr_at(self, step: int) -> float:
        progress = min(step, self.max_steps) / self.max_steps
        return self.min_lr + (self.initial_lr - self.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))

    def step(self, current_step: int | None = None) -> None:
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(current_step)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def get_last_lr(self) -> list[float]:
        return self._last_lr


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
    fused_optimizer: bool = True  # torch's fused AdamW on CUDA
    cuda_graphs: bool = True  # training steps and prediction replayed as CUDA graphs (single GPU, not compiled)
    size_multiple: int = 32

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        patch_size = self.configuration_manager.patch_size
        if len(patch_size) != 2:
            raise RuntimeError(
                f"{self.__class__.__name__} is a 2D network but configuration '{configuration}' has a "
                f"{len(patch_size)}D patch {patch_size}. Train the '2d' configuration.")
        rounded = round_up_patch_size(patch_size, self.size_multiple)
        if rounded != list(patch_size):
            # Stored in the plans that training saves next to the checkpoint, so that --val and
            # nnUNetv2_predict tile with the same patch size.
            self.configuration_manager.configuration["patch_size"] = rounded
            self.plans_manager.plans["configurations"][configuration]["patch_size"] = rounded
            self.print_to_log_file(f"Patch size {list(patch_size)} rounded up to {rounded} "
                                   f"(SA-UMamba needs multiples of {self.size_multiple}).")
        self.initial_lr = 1e-3
        self.weight_decay = 1e-2
        self.min_lr = 1e-5

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        # nnU-Net 2.7+ signature. A classmethod rather than nnU-Net's staticmethod so that each variant only
        # sets a class attribute; callers (the trainer and the predictor) call it the same way.
        network = SAUMamba(
            in_channels=num_input_channels, num_classes=num_output_channels, rfac=cls.rfac,
            residual_scale=cls.residual_scale, decoder_block=cls.decoder_block,
            deep_supervision=enable_deep_supervision, kernels=kernel_policy(cls.implementation),
        )
        # The heads always exist (strict loading in the predictor); frozen when unused so that DDP does not
        # wait for their gradients.
        network.deep_supervision_heads.requires_grad_(enable_deep_supervision)
        if cls.cuda_graphs and not _compile_requested():
            # nnUNetv2_predict's tiles (eval mode, one shape) replay one graph; no effect off CUDA
            enable_inference_graphs(network)
        return network

    def initialize(self) -> None:
        super().initialize()
        # the per-epoch validation runs kernel by kernel: an inference graph at the training batch size would keep
        # a second memory pool reserved beside the training graphs' for little gain
        disable_inference_graphs(self._plain_network())
        if self._use_cuda_graphs():
            enable_training_graphs(self.network)
            self.print_to_log_file("Training steps run as CUDA graphs (recorded at the first step; "
                                   "nnUNetTrainerSAUMambaNoCudaGraphs turns this off).")

    def on_train_end(self) -> None:
        # free the training graphs' reserved memory before the final validation
        disable_training_graphs(self.network)
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

    def configure_optimizers(self):
        # fused: one kernel for all 42M weights instead of foreach's launches (same update, ~10 ms less per step)
        optimizer = torch.optim.AdamW(self.network.parameters(), lr=self.initial_lr, weight_decay=self.weight_decay,
                                      fused=self.fused_optimizer and self.device.type == "cuda")
        return optimizer, CosineToMinLRScheduler(optimizer, self.initial_lr, self.num_epochs, self.min_lr)

    def _do_i_compile(self) -> bool:
        # Off by default. The scan is a registered custom op, so compiling keeps one graph (tested in ops), but
        # compiling the whole network took over two minutes on an H100 without a measured speedup
        # (docs/BENCHMARKS.md). nnUNet_compile=1 turns it on, on CUDA only (nnU-Net's 2D CPU compile crashes).
        return _compile_requested() and self.device.type == "cuda"


def _compile_requested() -> bool:
    return os.environ.get("nnUNet_compile", "").lower() in ("true", "1", "t")
