"""ImageNet initialisation from a VMamba-S v0 checkpoint, as the paper trains."""
import os

from nnunetv2_sa_umamba.checkpoints import CheckpointError, load_vmamba_pretrained
from nnunetv2_sa_umamba.training.nnUNetTrainerSAUMamba import nnUNetTrainerSAUMamba

CHECKPOINT_ENV = "SAUMAMBA_VMAMBA_CHECKPOINT"


class nnUNetTrainerSAUMambaImageNet(nnUNetTrainerSAUMamba):
    """Encoder and decoder blocks initialised from VMamba-S (``vmamba_small_e238_ema.pth``) at the path in
    the environment variable SAUMAMBA_VMAMBA_CHECKPOINT when a training starts from scratch. Resumed runs (--c),
    --val and nnUNetv2_predict use the run's own weights and need no ImageNet checkpoint."""

    def on_train_start(self) -> None:
        starting = self.current_epoch == 0  # a run resumed with --c has loaded its checkpoint's epoch already
        path = pretrained_checkpoint_path() if starting else None  # fail before nnU-Net starts its workers
        super().on_train_start()
        if path is None:
            return
        try:
            report = load_vmamba_pretrained(self._plain_network(), path)
        except CheckpointError as error:
            raise RuntimeError(f"ImageNet initialisation failed: {error}") from None
        self.print_to_log_file(f"ImageNet init from {path}: {report.summary()}")


def pretrained_checkpoint_path() -> str:
    """The readable file named by SAUMAMBA_VMAMBA_CHECKPOINT, or a RuntimeError saying what to set."""
    path = os.environ.get(CHECKPOINT_ENV, "")
    if not path:
        raise RuntimeError(
            f"nnUNetTrainerSAUMambaImageNet needs the VMamba-S v0 ImageNet checkpoint to start a training: set "
            f"{CHECKPOINT_ENV}=/path/to/vmamba_small_e238_ema.pth (nothing is downloaded).")
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise RuntimeError(f"{CHECKPOINT_ENV}={path} is not a readable file.")
    return path
