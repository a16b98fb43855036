"""The demo's short schedule (``saumamba_demo``); only the run length changes."""
import torch

from nnunetv2_sa_umamba.training.nnUNetTrainerSAUMamba import nnUNetTrainerSAUMamba


class nnUNetTrainerSAUMambaDemo(nnUNetTrainerSAUMamba):
    """The demo's schedule: 14 x 12 iterations. The whole demo took 9 minutes on a 2-core CPU with test Dice
    0.89; it can take longer than 15 minutes when other jobs share the cores (docs/DEMO.md)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 14
        self.num_iterations_per_epoch = 12
        self.num_val_iterations_per_epoch = 2
        self.save_every = 4

