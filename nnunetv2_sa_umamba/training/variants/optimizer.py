"""SGD with poly decay, nnU-Net's kind of recipe, instead of the paper's AdamW + cosine."""
import torch

from nnunetv2_sa_umamba.training.nnUNetTrainerSAUMamba import nnUNetTrainerSAUMamba


class nnUNetTrainerSAUMambaSGD(nnUNetTrainerSAUMamba):
    """SGD (lr 1e-2, Nesterov momentum 0.9, weight decay 1e-4) with warm-up and poly decay.

    nnU-Net's own momentum 0.99 makes each step ten times larger (lr / (1 - momentum)); with it SA-UMamba's loss
    rose from the first epoch and turned NaN on real data. Momentum 0.9 at lr 1e-2 is how TransUNet and
    Swin-UNet train their LayerNorm transformer U-Nets with SGD. The rate is not scaled to the batch (nnU-Net's
    1e-2 is meant for its small batches)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = 1e-2
        self.momentum = 0.9
        self.weight_decay = 1e-4
        self.lr_decay = "poly"
        self.min_lr = 0.0

    def learning_rate(self) -> float:
        return self.initial_lr

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.network.parameters(), lr=self.initial_lr, momentum=self.momentum,
                                    nesterov=True, weight_decay=self.weight_decay)
        return optimizer, self._lr_scheduler(optimizer, self.initial_lr)


class nnUNetTrainerSAUMambaPaperLR(nnUNetTrainerSAUMamba):
    """The released code's schedule as it is: AdamW at 1e-3 whatever the batch, no warm-up (cosine to 1e-5)."""
    scale_lr_to_batch = False
    warmup = False
