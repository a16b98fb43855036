"""Run length: smoke tests and the paper's 300 epochs."""
import torch

from nnunetv2_sa_umamba.training.nnUNetTrainerSAUMamba import nnUNetTrainerSAUMamba


class nnUNetTrainerSAUMamba_1epoch(nnUNetTrainerSAUMamba):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 1


class nnUNetTrainerSAUMamba_5epochs(nnUNetTrainerSAUMamba):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 5


class nnUNetTrainerSAUMamba_300epochs(nnUNetTrainerSAUMamba):
    """The paper's training length (its released configs train 300 epochs)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 300
