"""Trainers for the tests only, found by nnU-Net through ``nnUNet_extTrainer`` (tests/test_end_to_end.py adds
this folder to it); users never see them."""
from nnunetv2_sa_umamba.training.nnUNetTrainerSAUMamba import nnUNetTrainerSAUMamba


class nnUNetTrainerSAUMamba_tiny(nnUNetTrainerSAUMamba):
    """Two epochs of two iterations: exercises every stage of nnU-Net's workflow in seconds."""
    run_length = {"num_epochs": 2, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 1,
                  "save_every": 1}
