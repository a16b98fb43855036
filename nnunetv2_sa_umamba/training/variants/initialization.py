"""ImageNet initialisation from a VMamba-S v0 checkpoint, as the paper trains."""
import os

import torch
from torch._dynamo import OptimizedModule

from nnunetv2_sa_umamba.checkpoints import CheckpointError, load_vmamba_pretrained
from nnunetv2_sa_umamba.training.nnUNetTrainerSAUMamba import nnUNetTrainerSAUMamba

CHECKPOINT_ENV = "SAUMAMBA_VMAMBA_CHECKPOINT"


class nnUNetTrainerSAUMambaImageNet(nnUNetTrainerSAUMamba):
    """Encoder and decoder blocks initialised from VMamba-S (``vmamba_small_e238_ema.pth``) at the path in
    the environment variable SAUMAMBA_VMAMBA_CHECKPOINT. Resumed runs (--c) keep their own weights."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.pretrained_path = os.environ.get(CHECKPOINT_ENV, "")
        if not self.pretrained_path:
            raise RuntimeError(
                f"{self.__class__.__name__} needs the VMamba-S v0 ImageNet checkpoint: set {CHECKPOINT_ENV}="
                "/path/to/vmamba_small_e238_ema.pth (nothing is downloaded).")
        if not os.path.isfile(self.pretrained_path) or not os.access(self.pretrained_path, os.R_OK):
            raise RuntimeError(f"{CHECKPOINT_ENV}={self.pretrained_path} is not a readable file.")

    def initialize(self):
        super().initialize()
        network = self.network.module if self.is_ddp else self.network
        if isinstance(network, OptimizedModule):
            network = network._orig_mod
        try:
            report = load_vmamba_pretrained(network, self.pretrained_path)
        except CheckpointError as error:
            raise RuntimeError(f"ImageNet initialisation failed: {error}") from None
        self.print_to_log_file(f"ImageNet init from {self.pretrained_path}: {report.summary()}")
