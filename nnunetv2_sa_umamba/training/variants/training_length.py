"""Run length: smoke tests and the paper's 300 epochs."""
from nnunetv2_sa_umamba.training.nnUNetTrainerSAUMamba import nnUNetTrainerSAUMamba


class nnUNetTrainerSAUMamba_1epoch(nnUNetTrainerSAUMamba):
    run_length = {"num_epochs": 1}


class nnUNetTrainerSAUMamba_5epochs(nnUNetTrainerSAUMamba):
    run_length = {"num_epochs": 5}


class nnUNetTrainerSAUMamba_300epochs(nnUNetTrainerSAUMamba):
    """The paper's training length (its released configs train 300 epochs)."""
    run_length = {"num_epochs": 300}
