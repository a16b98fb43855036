"""Trainers for the tests only, found by nnU-Net through ``nnUNet_extTrainer`` (tests/test_end_to_end.py adds
this folder to it); users never see them."""
import torch

from nnunetv2_sa_umamba.training.nnUNetTrainerSAUMamba import nnUNetTrainerSAUMamba


class nnUNetTrainerSAUMamba_tiny(nnUNetTrainerSAUMamba):
    """Two epochs of two iterations: exercises every stage of nnU-Net's workflow in seconds."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 2
        self.num_iterations_per_epoch = 2
        self.num_val_iterations_per_epoch = 1
        self.save_every = 1
