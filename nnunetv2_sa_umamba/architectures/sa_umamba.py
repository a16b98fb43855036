"""SA-UMamba (Liu et al., PLoS One 2025): RSSS encoder, VSS decoder, additive skips.

With ``rfac=False, residual_scale=False`` it is VM-UNet. Shapes for a 3 x 256 x 256 input: patch embedding to
64 x 64 x 96, three PatchMerging steps to 8 x 8 x 768, the decoder back up to 64 x 64 x 96, a 4x expand to
256 x 256 x 24 and a 1x1 conv head.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nnunetv2_sa_umamba.modules.blocks import PatchEmbed, PatchExpand, PatchMerging, RSSSBlock, VSSBlock
from nnunetv2_sa_umamba.ops.policy import KernelPolicy, kernel_policy

PATCH_SIZE = 4
DECODER_BLOCK_TYPES = ("vss", "rsss")
NUM_DEEP_SUPERVISION_HEADS = 3


class EncoderStage(nn.Module):
    def __init__(self, blocks: Sequence[nn.Module], downsample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class DecoderStage(nn.Module):
    def __init__(self, upsample: nn.Module | None, blocks: Sequence[nn.Module]):
        super().__init__()
        self.upsample = upsample
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.upsample is not None:
            x = self.upsample(x)
        for block in self.blocks:
            x = block(x)
        return x


class SAUMamba(nn.Module):
    """(B, in_channels, H, W) -> logits (B, num_classes, H, W), any H and W.

    Inputs are zero-padded at the bottom/right to a multiple of 32 and every output is cropped back.
    With ``deep_supervision`` on, ``forward`` returns a list, highest resolution first:
    full resolution, then the outputs of decoder stages 3, 2, 1 at 1/4, 1/8 and 1/16 of the input
    (``output_scales()``), each from a 1x1 conv head. The heads always exist, so checkpoints load
    strictly whether or not deep supervision is used.

    ``kernels``: which kernels every module runs (``KernelPolicy``); by default ``kernel_policy()``, which reads
    ``SAUMAMBA_SCAN_BACKEND`` and ``SAUMAMBA_FUSED_KERNELS`` here, once, and rejects bad values.
    """

    # input sides are padded to this: the 4x patch embedding, then three 2x merges
    size_multiple = PATCH_SIZE * 2 ** 3

    def __init__(self, in_channels: int = 3, num_classes: int = 1,
                 dims: Sequence[int] = (96, 192, 384, 768), depths: Sequence[int] = (2, 2, 2, 2),
                 decoder_depths: Sequence[int] = (2, 2, 2, 1), d_state: int = 16, drop_path_rate: float = 0.2,
                 rfac: bool = True, residual_scale: bool = True, decoder_block: str = "vss",
                 deep_supervision: bool = False, kernels: KernelPolicy | None = None):
        super().__init__()
        if len(dims) != 4 or len(depths) != 4 or len(decoder_depths) != 4:
            raise ValueError("dims, depths and decoder_depths need 4 entries each (four resolutions)")
        if decoder_block not in DECODER_BLOCK_TYPES:
            raise ValueError(f"decoder_block must be one of {DECODER_BLOCK_TYPES}, got {decoder_block!r}")
        self.in_channels, self.num_classes = in_channels, num_classes
        self.dims = tuple(dims)
        self.deep_supervision = deep_supervision
        kernels = kernels or kernel_policy()
        self.kernels = kernels

        def rsss(dim: int, rate: float) -> nn.Module:
            return RSSSBlock(dim, rate, d_state, rfac=rfac, residual_scale=residual_scale, kernels=kernels)

        def vss(dim: int, rate: float) -> nn.Module:
            return VSSBlock(dim, rate, d_state, kernels=kernels)

        decoder_block_fn = vss if decoder_block == "vss" else rsss

        self.patch_embed = PatchEmbed(in_channels, dims[0], PATCH_SIZE, kernels)
        encoder_rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.encoder_stages = nn.ModuleList()
        for i, dim in enumerate(dims):
            rates = encoder_rates[sum(depths[:i]):sum(depths[:i + 1])]
            downsample = PatchMerging(dim, kernels) if i < len(dims) - 1 else None
            self.encoder_stages.append(EncoderStage([rsss(dim, r) for r in rates], downsample))

        decoder_dims = list(reversed(dims))
        decoder_rates = torch.linspace(0, drop_path_rate, sum(decoder_depths)).tolist()[::-1]
        self.decoder_stages = nn.ModuleList()
        for u, dim in enumerate(decoder_dims):
            rates = decoder_rates[sum(decoder_depths[:u]):sum(decoder_depths[:u + 1])]
            upsample = PatchExpand(2 * dim, dim, scale=2, kernels=kernels) if u > 0 else None
            self.decoder_stages.append(DecoderStage(upsample, [decoder_block_fn(dim, r) for r in rates]))

        final_dim = dims[0] // PATCH_SIZE
        self.final_expand = PatchExpand(dims[0], final_dim, scale=PATCH_SIZE, kernels=kernels)
        self.head = nn.Conv2d(final_dim, num_classes, 1)
        # on the outputs of decoder stages 3, 2, 1 (1/4, 1/8, 1/16)
        self.deep_supervision_heads = nn.ModuleList(
            nn.Conv2d(dim, num_classes, 1) for dim in decoder_dims[-NUM_DEEP_SUPERVISION_HEADS:][::-1])
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @staticmethod
    def output_scales() -> list[float]:
        """Scale of each deep-supervision output relative to the input, in the order ``forward`` returns them."""
        return [1.0] + [1.0 / (PATCH_SIZE * 2 ** i) for i in range(NUM_DEEP_SUPERVISION_HEADS)]

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if x.numel() == 0:
            raise ValueError(f"empty input {tuple(x.shape)}: need at least one image of at least 1 x 1 pixels")
        h, w = x.shape[-2:]
        pad_h, pad_w = -h % self.size_multiple, -w % self.size_multiple
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))

        x = self.patch_embed(x)
        skips = []
        for stage in self.encoder_stages:
            skips.append(x)
            x = stage(x)

        decoder_outputs = []
        for u, stage in enumerate(self.decoder_stages):
            x = stage(x if u == 0 else x + skips[-u])
            decoder_outputs.append(x)

        logits = self.head(self.final_expand(x).permute(0, 3, 1, 2))
        if pad_h or pad_w:
            logits = logits[..., :h, :w]
        if not self.deep_supervision:
            return logits
        outputs = [logits]
        # decoder_outputs[-1] is at 1/4, [-2] at 1/8, [-3] at 1/16
        for i, head in enumerate(self.deep_supervision_heads):
            scale = PATCH_SIZE * 2 ** i
            feature = decoder_outputs[-1 - i].permute(0, 3, 1, 2)
            outputs.append(head(feature)[..., :_ceil_div(h, scale), :_ceil_div(w, scale)])
        return outputs


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)
