"""Trainers for the tests only, found by nnU-Net through ``nnUNet_extTrainer`` (tests/test_end_to_end.py adds
this folder to it); users never see them."""
from unittest import mock

from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

import nnunetv2_sa_umamba.training.nnUNetTrainerSAUMamba as trainer_module
from nnunetv2_sa_umamba.architectures.sa_umamba import SAUMamba
from nnunetv2_sa_umamba.training.nnUNetTrainerSAUMamba import nnUNetTrainerSAUMamba

# a quarter of the paper's widths (as benchmark_network.py --smoke): 3 M parameters instead of 42 M, so that each
# checkpoint (weights and AdamW state) is 40 MB rather than 0.5 GB to write, load and zip
NARROW_DIMS = (24, 48, 96, 192)


class NarrowSAUMamba(SAUMamba):
    """SAUMamba with NARROW_DIMS; every other argument as the trainer passes it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, dims=NARROW_DIMS, **kwargs)


class nnUNetTrainerSAUMamba_tiny(nnUNetTrainerSAUMamba):
    """Two epochs of two iterations of a narrow SA-UMamba: exercises every stage of nnU-Net's workflow in seconds."""
    run_length = {"num_epochs": 2, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 1,
                  "save_every": 1}

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        # the base trainer's own build (the predictor's too), with the narrow network in place of SAUMamba; the same
        # signature, by which nnU-Net tells the current calling convention from the old one
        with mock.patch.object(trainer_module, "SAUMamba", NarrowSAUMamba):
            return super().build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                      num_output_channels, enable_deep_supervision)
