"""RFAConv (receptive-field attention convolution), kernel 3, stride 1, C -> C, as SA-UMamba's RFAC branch.

weight  = softmax over the 9 receptive-field positions of GroupConv1x1(AvgPool3x3(x))   (B, C, 9, H, W)
feature = ReLU(BN(GroupConv3x3(x)))                                                   (B, C, 9, H, W)
out     = ReLU(BN(Conv3x3_stride3(rearrange(feature * weight, 'b c (3 3) h w -> b c (3h) (3w)'))))

The last convolution sees each 3x3 block of the rearranged map exactly once, so it equals a 1x1 convolution
over the 9C channels (c, position) of the un-rearranged product; the ``"fast"`` implementation computes it
that way and never builds the 3H x 3W map, and computes the grouped 1x1 conv of the weight branch (one input
channel per group) as a broadcast multiply. On CUDA (with Triton) ``"fast"`` runs the whole chain up to the
last BatchNorm as fused kernels that keep only the input for the backward (ops/rfaconv/).
``"reference"`` runs the released code's operations.
Parameters: 9C^2 + 111C.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from nnunetv2_sa_umamba.ops import rfaconv as rfaconv_op
from nnunetv2_sa_umamba.ops.common import RFACONV_POSITIONS as KERNEL_POSITIONS
from nnunetv2_sa_umamba.ops.policy import KernelPolicy, kernel_policy


class RFAConv(nn.Module):
    """(B, C, H, W) -> (B, C, H, W); with ``channels_last=True`` (B, H, W, C) -> (B, H, W, C).

    ``kernels``: the kernel policy (its ``implementation`` and ``rfaconv``), by default ``kernel_policy()``."""

    def __init__(self, channels: int, kernels: KernelPolicy | None = None):
        super().__init__()
        self.channels = channels
        self.kernels = kernels or kernel_policy()
        c9 = channels * KERNEL_POSITIONS
        self.weight_pool = nn.AvgPool2d(3, stride=1, padding=1)
        self.weight_conv = nn.Conv2d(channels, c9, 1, groups=channels, bias=False)
        self.feature_conv = nn.Conv2d(channels, c9, 3, padding=1, groups=channels, bias=False)
        self.feature_norm = nn.BatchNorm2d(c9)
        self.out_conv = nn.Conv2d(channels, channels, 3, stride=3, bias=True)
        self.out_norm = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        if self.kernels.fast and rfaconv_op.use_fused(x, self.kernels.rfaconv, self):
            out = self._forward_fused(x if channels_last else x.permute(0, 2, 3, 1))
            return out if channels_last else out.permute(0, 3, 1, 2)
        if channels_last:
            # contiguous NCHW: cuDNN's grouped 3x3 conv is much slower on channels_last memory
            out = self._forward_unfused(x.permute(0, 3, 1, 2).contiguous()).permute(0, 2, 3, 1)
            # the released code copies the result back to contiguous channel-last memory before the residual add
            return out if self.kernels.fast else out.contiguous()
        return self._forward_unfused(x)

    def _forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        # the permuted view is channels_last memory, which BatchNorm2d handles without a copy
        out = rfaconv_op.rfaconv_chain(self, x).permute(0, 3, 1, 2)
        return F.relu(self.out_norm(out)).permute(0, 2, 3, 1)

    def _forward_unfused(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        feature = F.relu(self.feature_norm(self.feature_conv(x))).view(b, c, KERNEL_POSITIONS, h, w)
        if not self.kernels.fast:
            weight = self.weight_conv(self.weight_pool(x)).view(b, c, KERNEL_POSITIONS, h, w).softmax(dim=2)
            unfolded = rearrange(feature * weight, "b c (n1 n2) h w -> b c (h n1) (w n2)", n1=3, n2=3)
            out = self.out_conv(unfolded)
        else:
            # a grouped 1x1 conv with one input channel per group is a broadcast multiply; cuDNN's grouped
            # backward is far slower than the elementwise one
            pooled = self.weight_pool(x).unsqueeze(2)
            weight = (pooled * self.weight_conv.weight.view(1, c, KERNEL_POSITIONS, 1, 1)).softmax(dim=2)
            weighted = feature * weight
            # (C_out, C, 3, 3) -> (C_out, C*9, 1, 1): channel c*9 + position matches the view above
            out = F.conv2d(weighted.view(b, c * KERNEL_POSITIONS, h, w),
                           self.out_conv.weight.reshape(c, c * KERNEL_POSITIONS, 1, 1), self.out_conv.bias)
        return F.relu(self.out_norm(out))
