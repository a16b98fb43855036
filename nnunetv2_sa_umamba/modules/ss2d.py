"""SS2D: VMamba v0's 2D selective-scan module, as used by VM-UNet and SA-UMamba.

Two implementations of the same math, chosen per module by its kernel policy's ``implementation``:

- ``"reference"``: the released code's operations (stacked/flipped cross-scan copies, einsum projections,
  float32 scan inputs): the baseline the fast path is tested and timed against.
- ``"fast"``: the same values computed with fewer copies (broadcast matmuls instead of einsums; on CUDA the
  cross-scan and cross-merge as one Triton kernel each, elsewhere one preallocated cross-scan buffer,
  ops/cross_scan/; the output gate out_norm(y) * silu(z) as one op that keeps only y and z, ops/layernorm/)
  and, under autocast, 16-bit scan inputs. The scan keeps its state in float32 either way; fp16 autocast runs
  the scan with bfloat16 inputs because the kernel's fp16 output overflows (scan outputs reach ~1e6).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nnunetv2_sa_umamba.ops import cross_scan as cross_scan_op
from nnunetv2_sa_umamba.ops.common import matmul_dtype
from nnunetv2_sa_umamba.ops.cross_scan import NUM_DIRECTIONS, cross_merge, cross_scan
from nnunetv2_sa_umamba.ops.layernorm import layer_norm_gate
from nnunetv2_sa_umamba.ops.policy import KernelPolicy, kernel_policy
from nnunetv2_sa_umamba.ops.recompute import rebuilt_in_backward
from nnunetv2_sa_umamba.ops.scan import selective_scan, selective_scan_lowrank_delta


def scan_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of the fast path's scan inputs for ``x``: float32, or bfloat16 under any autocast."""
    if not torch.is_autocast_enabled(x.device.type):
        return torch.float32
    # bf16 has float32's range; fp16 scan outputs overflow.
    return torch.bfloat16


class SS2D(nn.Module):
    """(B, H, W, C) -> (B, H, W, C). d_inner D = expand * C, dt_rank R = ceil(C / 16).

    ``kernels``: the kernel policy (``implementation``, ``scan``, ``cross_scan``, ``layernorm`` for the output gate),
    by default ``kernel_policy()``."""

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 3, expand: int = 2,
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4,
                 kernels: KernelPolicy | None = None):
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16)
        self.kernels = kernels or kernel_policy()
        d_inner, dt_rank, k = self.d_inner, self.dt_rank, NUM_DIRECTIONS

        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv2d = nn.Conv2d(d_inner, d_inner, d_conv, padding=(d_conv - 1) // 2, groups=d_inner, bias=True)
        self.act = nn.SiLU()

        # x_proj: 4 nn.Linear(D, R + 2N) with PyTorch's default init, stacked
        x_proj_bound = 1 / math.sqrt(d_inner)
        self.x_proj_weight = nn.Parameter(
            torch.empty(k, dt_rank + 2 * d_state, d_inner).uniform_(-x_proj_bound, x_proj_bound))
        dt_bound = dt_rank ** -0.5
        self.dt_projs_weight = nn.Parameter(torch.empty(k, d_inner, dt_rank).uniform_(-dt_bound, dt_bound))
        dt = torch.exp(torch.rand(k, d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_projs_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
        a = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(k * d_inner, 1)
        self.A_logs = nn.Parameter(torch.log(a))
        self.Ds = nn.Parameter(torch.ones(k * d_inner))

        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, z = self.in_proj(x).chunk(2, dim=-1)
        if not self.kernels.fast:
            y = self._forward_core_reference(self.act(self.conv2d(x.permute(0, 3, 1, 2).contiguous())))
            return self.out_proj(self.out_norm(y) * F.silu(z))
        # the channel-last permute is channels_last memory, on which cuDNN's depthwise conv is faster
        y = self._forward_core_fast(self.conv2d(x.permute(0, 3, 1, 2)))
        # one kernel on CUDA that keeps only y and z for the backward; rounded once for the projection. y in rows
        # (the fused cross-merge writes it so) as the gate keeps it: the rebuild below then keeps no other copy
        y, out_dtype = y.contiguous(), matmul_dtype(y)

        def gated() -> torch.Tensor:
            return layer_norm_gate(y, z, self.out_norm, out_dtype, self.kernels.layernorm)

        gate_out = gated()
        # the projection's backward gets its input rebuilt from y and z, which the gate's backward keeps anyway
        with rebuilt_in_backward(gate_out, gated):
            return self.out_proj(gate_out)

    def scan_parameters(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The scan's A (4D, N), D (4D,) and delta bias (4D,), float32."""
        a = -torch.exp(self.A_logs.float())
        return a, self.Ds.float(), self.dt_projs_bias.float().view(-1)

    def _forward_core_reference(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W) -> (B, H, W, D), the released code's operations."""
        b, d, h, w = x.shape
        length, k = h * w, NUM_DIRECTIONS
        x_hw_wh = torch.stack([x.view(b, -1, length), x.transpose(2, 3).contiguous().view(b, -1, length)],
                              dim=1).view(b, 2, -1, length)
        xs = torch.cat([x_hw_wh, torch.flip(x_hw_wh, dims=[-1])], dim=1)
        x_dbl = torch.einsum("b k d l, k c d -> b k c l", xs.view(b, k, -1, length), self.x_proj_weight)
        dts, bs, cs = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=2)
        dts = torch.einsum("b k r l, k d r -> b k d l", dts.view(b, k, -1, length), self.dt_projs_weight)
        a, ds, dt_bias = self.scan_parameters()
        out_y = selective_scan(
            xs.float().view(b, -1, length), dts.contiguous().float().view(b, -1, length), a,
            bs.float().view(b, k, -1, length), cs.float().view(b, k, -1, length), ds,
            delta_bias=dt_bias, delta_softplus=True, backend=self.kernels.scan,
        ).view(b, k, -1, length)
        inv_y = torch.flip(out_y[:, 2:4], dims=[-1]).view(b, 2, -1, length)
        wh_y = out_y[:, 1].view(b, -1, w, h).transpose(2, 3).contiguous().view(b, -1, length)
        invwh_y = inv_y[:, 1].view(b, -1, w, h).transpose(2, 3).contiguous().view(b, -1, length)
        y = out_y[:, 0] + inv_y[:, 0] + wh_y + invwh_y
        return y.transpose(1, 2).contiguous().view(b, h, w, -1)

    def _forward_core_fast(self, conv_out: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W) conv output -> (B, H, W, D), same values with fewer copies and 16-bit scan inputs."""
        b, d, h, w = conv_out.shape
        length, k = h * w, NUM_DIRECTIONS
        dtype = scan_dtype(conv_out)
        fused = cross_scan_op.use_fused(conv_out, self.kernels.cross_scan)

        def scan_input() -> torch.Tensor:
            # the conv's output is channels_last memory, so the permute is free
            return cross_scan(self.act(conv_out).permute(0, 2, 3, 1), dtype, fused)

        xs = scan_input()
        # xs (4x the conv output) is not kept for the backward: the matmul's and the scan's backward get it rebuilt
        # from the conv output, which the SiLU's backward keeps anyway
        with rebuilt_in_backward(xs, scan_input):
            with torch.autocast(conv_out.device.type, enabled=False):
                # per-direction projections as broadcast batched matmuls: no einsum permute copies
                x_dbl = torch.matmul(self.x_proj_weight.to(dtype), xs)
                dts, bs, cs = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=2)
                dt_weight = self.dt_projs_weight.to(dtype)
            a, ds, dt_bias = self.scan_parameters()
            # delta = dt_weight @ dts per direction, inside the scan: its backward recomputes delta (2C rows per
            # direction) from dts (C / 16 rows) instead of keeping it
            # B and C as views of x_dbl, which the backward keeps for dts anyway (mamba-ssm's kernel reads strided
            # B and C; the other backends copy them themselves)
            ys = selective_scan_lowrank_delta(
                xs.view(b, k * d, length), dts, dt_weight, a, bs, cs, ds,
                delta_bias=dt_bias, delta_softplus=True, backend=self.kernels.scan,
                scan_forward=self.kernels.scan_forward, scan_backward=self.kernels.scan_backward,
            ).view(b, k, d, length)
        return cross_merge(ys, h, w, fused)
