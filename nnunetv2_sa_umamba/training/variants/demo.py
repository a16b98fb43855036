"""The demo's short schedule (``saumamba_demo``); only the run length changes."""
from nnunetv2_sa_umamba.training.nnUNetTrainerSAUMamba import nnUNetTrainerSAUMamba


class nnUNetTrainerSAUMambaDemo(nnUNetTrainerSAUMamba):
    """The demo's schedule: 14 epochs of 12 iterations (its time and Dice: docs/DEMO.md)."""
    run_length = {"num_epochs": 14, "num_iterations_per_epoch": 12, "num_val_iterations_per_epoch": 2,
                  "save_every": 4}
