"""Building blocks of SA-UMamba / VM-UNet. All take and return channel-last (B, H, W, C) tensors except
PatchEmbed (NCHW in)."""
from __future__ import annotations

import torch
from einops import rearrange
from timm.layers import DropPath
from torch import nn

from nnunetv2_sa_umamba.modules.rfaconv import RFAConv
from nnunetv2_sa_umamba.modules.ss2d import SS2D
from nnunetv2_sa_umamba.ops.common import matmul_dtype
from nnunetv2_sa_umamba.ops.layernorm import layer_norm
from nnunetv2_sa_umamba.ops.policy import KernelPolicy, kernel_policy

LAYER_NORM_EPS = 1e-5


# PyTorch's LayerNorm under autocast runs in float32 (copying half-precision inputs first) and writes float32,
# which a following matmul casts again; the Triton kernel reads the input as it is, writes the dtype the consumer
# takes and handles many rows per program.
class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm over the last dim (same parameters); the ``"fast"`` implementation runs it as one Triton kernel
    on CUDA (ops/layernorm/, as the policy's ``layernorm`` allows), many rows per program, except while
    torch.compile traces it (Inductor fuses the LayerNorm itself, where the kernel would break the graph)."""

    def __init__(self, dim: int, kernels: KernelPolicy | None = None):
        super().__init__(dim, eps=LAYER_NORM_EPS)
        self.kernels = kernels or kernel_policy()

    def forward(self, x: torch.Tensor, feeds_matmul: bool = False) -> torch.Tensor:
        """``feeds_matmul``: a matmul reads the result, so the fused kernel may write it rounded to autocast's
        dtype, as autocast would round it before the matmul anyway."""
        if not self.kernels.fast or torch.compiler.is_compiling():
            return super().forward(x)
        return layer_norm(x, self, matmul_dtype(x) if feeds_matmul else None, self.kernels.layernorm)


class PatchEmbed(nn.Module):
    """(B, C_in, H, W) -> (B, H/p, W/p, C): strided conv, then LayerNorm."""

    def __init__(self, in_channels: int, dim: int, patch_size: int = 4, kernels: KernelPolicy | None = None):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = LayerNorm(dim, kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class PatchMerging(nn.Module):
    """(B, H, W, C) -> (B, H/2, W/2, 2C): 2x2 neighbours concatenated, LayerNorm(4C), Linear(4C, 2C)."""

    def __init__(self, dim: int, kernels: KernelPolicy | None = None):
        super().__init__()
        self.norm = LayerNorm(4 * dim, kernels)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x, feeds_matmul=True))


class PatchExpand(nn.Module):
    """(B, H, W, C_in) -> (B, pH, pW, C_out): Linear(C_in, p^2 C_out), pixel shuffle, LayerNorm(C_out).

    The decoder uses p=2 with C_in = 2 C_out; the final expand uses p=4 with C_in = 4 C_out."""

    def __init__(self, in_dim: int, out_dim: int, scale: int, kernels: KernelPolicy | None = None):
        super().__init__()
        self.scale = scale
        self.expand = nn.Linear(in_dim, scale * scale * out_dim, bias=False)
        self.norm = LayerNorm(out_dim, kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = rearrange(self.expand(x), "b h w (p1 p2 c) -> b (h p1) (w p2) c", p1=self.scale, p2=self.scale)
        return self.norm(x)


class VSSBlock(nn.Module):
    """x + DropPath(SS2D(LN(x)))."""

    def __init__(self, dim: int, drop_path: float = 0.0, d_state: int = 16, kernels: KernelPolicy | None = None):
        super().__init__()
        kernels = kernels or kernel_policy()  # one resolution for all sub-modules
        self.norm1 = LayerNorm(dim, kernels)
        self.ss2d = SS2D(dim, d_state=d_state, kernels=kernels)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.ss2d(self.norm1(x, feeds_matmul=True)))


class RSSSBlock(nn.Module):
    """Residual spatial-attention selective-scan block (SA-UMamba's encoder block).

    Z = X * s1 + DropPath(SS2D(LN1(X)));  Y = Z * s2 + RFAC(LN2(Z)).
    ``residual_scale=False`` fixes s1 = s2 = 1 (no parameters); ``rfac=False`` drops the second half
    (Y = Z), which with ``residual_scale=False`` is exactly a VSS block.
    """

    def __init__(self, dim: int, drop_path: float = 0.0, d_state: int = 16, rfac: bool = True,
                 residual_scale: bool = True, kernels: KernelPolicy | None = None):
        super().__init__()
        kernels = kernels or kernel_policy()  # one resolution for all sub-modules
        self.norm1 = LayerNorm(dim, kernels)
        self.ss2d = SS2D(dim, d_state=d_state, kernels=kernels)
        self.drop_path = DropPath(drop_path)
        self.scale1 = nn.Parameter(torch.ones(dim)) if residual_scale else None
        self.norm2 = self.rfac = self.scale2 = None
        if rfac:
            self.norm2 = LayerNorm(dim, kernels)
            self.rfac = RFAConv(dim, kernels=kernels)
            self.scale2 = nn.Parameter(torch.ones(dim)) if residual_scale else None

    @staticmethod
    def _scaled(x: torch.Tensor, scale: nn.Parameter | None) -> torch.Tensor:
        return x if scale is None else x * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self._scaled(x, self.scale1) + self.drop_path(self.ss2d(self.norm1(x, feeds_matmul=True)))
        if self.rfac is None:
            return z
        # float32 under autocast, as nn.LayerNorm gives it: RFAConv's pooling and softmax are not autocast ops
        attention = self.rfac(self.norm2(z), channels_last=True)
        return self._scaled(z, self.scale2) + attention
