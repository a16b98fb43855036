"""Re-exports for nnU-Net's trainer discovery (see __init__.py)."""
from nnunetv2_sa_umamba.training.nnUNetTrainerSAUMamba import nnUNetTrainerSAUMamba  # noqa: F401
from nnunetv2_sa_umamba.training.variants.demo import nnUNetTrainerSAUMambaDemo  # noqa: F401
from nnunetv2_sa_umamba.training.variants.initialization import nnUNetTrainerSAUMambaImageNet  # noqa: F401
from nnunetv2_sa_umamba.training.variants.network_architecture import (  # noqa: F401
    nnUNetTrainerSAUMambaNoCudaGraphs,
    nnUNetTrainerSAUMambaNoDeepSupervision,
    nnUNetTrainerSAUMambaReference,
    nnUNetTrainerSAUMambaRFACOnly,
    nnUNetTrainerSAUMambaRSSSDecoder,
    nnUNetTrainerSAUMambaScaleOnly,
    nnUNetTrainerVMUNet,
)
from nnunetv2_sa_umamba.training.variants.optimizer import (  # noqa: F401
    nnUNetTrainerSAUMambaPaperLR,
    nnUNetTrainerSAUMambaSGD,
)
from nnunetv2_sa_umamba.training.variants.training_length import (  # noqa: F401
    nnUNetTrainerSAUMamba_1epoch,
    nnUNetTrainerSAUMamba_5epochs,
    nnUNetTrainerSAUMamba_300epochs,
)
