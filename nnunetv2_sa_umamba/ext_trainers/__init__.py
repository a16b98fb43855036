"""The folder for nnU-Net's ``nnUNet_extTrainer``: thin modules that re-export our trainers.

nnU-Net (>= 2.8) imports every module in this folder as a top-level name and looks up the trainer class
by name; ``export nnUNet_extTrainer=$(saumamba_trainer_path)`` makes ``-tr nnUNetTrainerSAUMamba`` work in
nnUNetv2_train, nnUNetv2_predict and the other nnU-Net commands.
"""
import os


def trainer_dir() -> str:
    return os.path.dirname(os.path.abspath(__file__))


def print_path() -> None:
    print(trainer_dir())
