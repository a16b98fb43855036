"""Architecture variants: the paper's ablations (Table 5), its text's decoder, deep supervision, and the
straightforward implementation that speedups are measured against."""
import torch

from nnunetv2_sa_umamba.training.nnUNetTrainerSAUMamba import nnUNetTrainerSAUMamba


class nnUNetTrainerVMUNet(nnUNetTrainerSAUMamba):
    """Table 5 baseline: VM-UNet (plain VSS blocks, no RFAC, no residual scales)."""
    rfac = False
    residual_scale = False


class nnUNetTrainerSAUMambaScaleOnly(nnUNetTrainerSAUMamba):
    """Table 5: learnable residual scales without the RFAC branch."""
    rfac = False


class nnUNetTrainerSAUMambaRFACOnly(nnUNetTrainerSAUMamba):
    """Table 5: RFAC branch with plain (unscaled) residuals."""
    residual_scale = False


class nnUNetTrainerSAUMambaRSSSDecoder(nnUNetTrainerSAUMamba):
    """The paper text's reading: RSSS blocks in the decoder too (the released code uses VSS blocks)."""
    decoder_block = "rsss"


class nnUNetTrainerSAUMambaReference(nnUNetTrainerSAUMamba):
    """The speed baseline: training as the released code runs it, which differs from the default trainer in three
    switches, set together on purpose: its operations (``implementation``: float32 scan inputs, einsum projections,
    rearranged RFAConv; same values, slower), torch's default AdamW (``fused_optimizer``) and kernel-by-kernel
    launches (``cuda_graphs``; nnUNetTrainerSAUMambaNoCudaGraphs changes only that one). A subclass that sets one
    attribute changes one thing. Weights are interchangeable with the default trainer's."""
    implementation = "reference"
    fused_optimizer = False
    cuda_graphs = False


class nnUNetTrainerSAUMambaNoCudaGraphs(nnUNetTrainerSAUMamba):
    """Training steps and prediction launched kernel by kernel (for profiling, or where CUDA graphs misbehave)."""
    cuda_graphs = False


class nnUNetTrainerSAUMambaNoDeepSupervision(nnUNetTrainerSAUMamba):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.enable_deep_supervision = False
