"""nnU-Net's default optimisation recipe (SGD, Nesterov momentum 0.99, lr 1e-2, poly decay) instead of the
paper's AdamW + cosine."""
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_sa_umamba.training.nnUNetTrainerSAUMamba import nnUNetTrainerSAUMamba


class nnUNetTrainerSAUMambaSGD(nnUNetTrainerSAUMamba):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = 1e-2
        self.weight_decay = 3e-5

    def configure_optimizers(self):
        return nnUNetTrainer.configure_optimizers(self)
