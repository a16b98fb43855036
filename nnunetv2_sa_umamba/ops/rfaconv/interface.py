"""RFAConv's conv-BN-ReLU-softmax-product-conv chain as one autograd op over the Triton kernels
(ops/rfaconv/kernels.py), and when it runs."""
from __future__ import annotations

import torch
from torch import nn

from nnunetv2_sa_umamba.ops.common import RFACONV_POSITIONS as POSITIONS
from nnunetv2_sa_umamba.ops.common import fused_kernels_run, lazy_module, matmul_dtype

_kernels = lazy_module("nnunetv2_sa_umamba.ops.rfaconv.kernels")


def use_fused(x: torch.Tensor, choice: str, module: nn.Module | None = None) -> bool:
    """Whether RFAConv ``module`` runs the fused kernels on ``x`` (B, H, W, C) or (B, C, H, W), for its kernel
    choice ("auto", "triton" or "torch", ``KernelPolicy.rfaconv``).

    Not under torch.use_deterministic_algorithms (the kernels reduce with atomic adds), and not for a
    SyncBatchNorm in training (multi-GPU: its statistics and gradient sums are synchronised across GPUs)."""
    if torch.are_deterministic_algorithms_enabled():
        return False
    if module is not None and isinstance(module.feature_norm, nn.SyncBatchNorm) and module.feature_norm.training:
        return False
    return fused_kernels_run(choice, x, x.numel() * POSITIONS, f"RFAConv with kernels {choice!r}")


class _RFAConvChain(torch.autograd.Function):
    """(B, H, W, C) -> (B, H, W, C): everything of RFAConv up to and including the stride-3 conv's bias.

    Parameters and statistics come in the kernels' layout (kernels.py): wf (9, 9, C), wc, gamma, beta,
    mean, rstd (9, C), w_out (C, 9C) with column k * C + c."""

    @staticmethod
    def forward(ctx, x, wf, wc, gamma, beta, w_out, b_out, mean, rstd, batch_stats: bool,
                compute_dtype: torch.dtype):
        kernels = _kernels()
        scale = (gamma.float() * rstd).contiguous()
        shift = (beta.float() - mean * scale).contiguous()
        precision = kernels.products_precision(compute_dtype)
        weighted = kernels.weighted_features(x, wf, wc, scale, shift, compute_dtype, precision)
        out = torch.addmm(b_out.to(compute_dtype), weighted, w_out.to(compute_dtype).t())
        ctx.save_for_backward(x, wf, wc, gamma, w_out, mean, rstd, scale, shift)
        ctx.batch_stats, ctx.compute_dtype = batch_stats, compute_dtype
        ctx.grad_dtypes = [t.dtype for t in (x, wf, wc, gamma, beta, w_out, b_out)]
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, grad_out):
        kernels = _kernels()
        x, wf, wc, gamma, w_out, mean, rstd, scale, shift = ctx.saved_tensors
        dtype = ctx.compute_dtype
        precision = kernels.products_precision(dtype)
        n = x.numel() // x.shape[-1]
        grad_out = grad_out.reshape(n, x.shape[-1]).to(dtype)
        weighted = kernels.weighted_features(x, wf, wc, scale, shift, dtype, precision)  # recomputed, never stored
        grad_w_out = (grad_out.t() @ weighted).float()
        del weighted
        grad_b_out = grad_out.float().sum(0)
        # dL/dweighted in the (P, 9, C) layout that the kernels read
        grad_weighted = grad_out @ w_out.to(dtype)
        grad_pooled, grad_y_sum, grad_y_f_sum, grad_wc = kernels.backward_reduce(x, wf, wc, scale, shift,
                                                                                 grad_weighted, precision)
        gamma = gamma.float()
        grad_gamma = rstd * (grad_y_f_sum - mean * grad_y_sum)  # sum of dL/dy * normalised f
        grad_beta = grad_y_sum
        coef_y = gamma * rstd
        if ctx.batch_stats:  # the mean and variance depend on f too
            coef_f = -gamma * rstd * rstd * grad_gamma / n
            coef_1 = -coef_y * grad_beta / n - coef_f * mean
        else:
            coef_f = coef_1 = torch.zeros_like(coef_y)
        grad_f, grad_wf = kernels.backward_features(x, wf, wc, scale, shift, grad_weighted, coef_y.contiguous(),
                                                    coef_f.contiguous(), coef_1.contiguous(), precision)
        del grad_weighted
        grad_x = kernels.backward_input(x, wf, grad_f, grad_pooled)
        grads = (grad_x, grad_wf, grad_wc, grad_gamma, grad_beta, grad_w_out, grad_b_out)
        return tuple(g.to(dtype) for g, dtype in zip(grads, ctx.grad_dtypes, strict=True)) + (None,) * 4


def _batch_norm_statistics(bn: nn.BatchNorm2d, x: torch.Tensor, wf: torch.Tensor, compute_dtype: torch.dtype):
    """Mean and 1/std (each (9, C)) that ``bn`` normalises f with, updating its running statistics as
    nn.BatchNorm2d does (f computed as for ``compute_dtype``). ``bn``'s channel c * 9 + k is entry (k, c)."""
    c = x.shape[-1]
    batch_stats = bn.training or not bn.track_running_stats
    if not batch_stats:
        # a copy: the backward keeps it, and the buffer may change before then
        mean, var = (v.float().view(c, POSITIONS).t() for v in (bn.running_mean, bn.running_var))
        return mean.clone(memory_format=torch.contiguous_format), (var + bn.eps).rsqrt().contiguous(), False
    n = x.numel() // c
    if n == 1:  # as nn.BatchNorm2d, and before any running statistic changes
        raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                         f"{[1, c * POSITIONS, 1, 1]}")
    with torch.no_grad():
        kernels = _kernels()
        total, total_sq = kernels.feature_statistics(x, wf, kernels.products_precision(compute_dtype))
        mean = total / n
        # float32 sums: exact enough unless |mean| is far above the standard deviation of f
        var = (total_sq / n - mean * mean).clamp_min(0)
        if bn.training and bn.track_running_stats:
            bn.num_batches_tracked.add_(1)
            momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
            bn.running_mean.mul_(1 - momentum).add_(mean.t().reshape(-1), alpha=momentum)
            bn.running_var.mul_(1 - momentum).add_(var.t().reshape(-1) * (n / max(n - 1, 1)), alpha=momentum)
    return mean, (var + bn.eps).rsqrt(), True


def _kernel_layout(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """A per-(c, k) parameter of the module (index c * 9 + k first) as (9, C), differentiably."""
    return weight.reshape(channels, POSITIONS, -1).transpose(0, 1).squeeze(-1).contiguous()


@torch.compiler.disable
def rfaconv_chain(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """RFAConv ``module``'s output before its last BatchNorm and ReLU, for channel-last ``x`` (B, H, W, C)."""
    c = module.channels
    x = x.contiguous()
    # (c, k, tap) -> (tap, k, c); (c_out, c, k) -> (c_out, k, c): small copies that autograd differentiates
    wf = module.feature_conv.weight.view(c, POSITIONS, 9).permute(2, 1, 0).contiguous()
    w_out = module.out_conv.weight.view(c, c, POSITIONS).transpose(1, 2).reshape(c, POSITIONS * c)
    bn = module.feature_norm
    compute_dtype = matmul_dtype(x) or x.dtype
    mean, rstd, batch_stats = _batch_norm_statistics(bn, x, wf.detach().float(), compute_dtype)
    return _RFAConvChain.apply(x, wf, _kernel_layout(module.weight_conv.weight, c), _kernel_layout(bn.weight, c),
                               _kernel_layout(bn.bias, c), w_out, module.out_conv.bias, mean, rstd, batch_stats,
                               compute_dtype)
