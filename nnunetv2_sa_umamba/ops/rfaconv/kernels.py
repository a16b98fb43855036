"""RFAConv's 9C-channel chain as fused Triton kernels (forward and backward), on channel-last tensors.

For input x (P = B*H*W positions, C channels) the chain is, per channel c and receptive-field position k:

    f[p, k, c]        = sum_j wf[j, k, c] * x[p + offset_j, c]          grouped 3x3 conv, C -> 9C, zero padding
    y                 = BatchNorm(f)                                     batch statistics in training
    s[p, :, c]        = softmax_k(avgpool3x3(x)[p, c] * wc[k, c])        the grouped 1x1 conv of one input channel
    weighted[p, k, c] = relu(y) * s
    out[p, :]         = weighted[p] (flattened k-major) @ w_out^T + b   the stride-3 conv, a (9C -> C) matmul

Layouts ("kernel layout", k-major so that channel runs are contiguous): x (P, C); wf (9 taps, 9, C); wc and
every per-(k, c) vector (9, C); weighted and its gradients (P, 9, C). ops/rfaconv/interface.py converts the
module's parameters. The kernels recompute f, y and s from x wherever they need them, so none of the 9C-channel
tensors of the unfused chain is kept between forward and backward; the batch-norm statistics come from a first
pass that reduces f without storing it. Accumulation is float32 whatever the input dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from nnunetv2_sa_umamba.ops.common import RFACONV_POSITIONS as POSITIONS

BLOCK_K = 16  # the 9 positions, padded to a power of two
# (positions per tile, channels per tile, warps, tiles per program) per kernel; programs that reduce over
# positions loop over several tiles so that fewer partial sums meet in atomic adds
# Chosen for the stage-1 and stage-3 shapes of a 28 x 256 x 256 batch together on an H100, then retuned from sweeps at
# all four stage shapes on an H200 (docs/BENCHMARKS.md): "weighted" and "backward_input" read and write (P, 9, C)
# rows, whose channel runs are contiguous, so few positions by 64 channels in one warp won (0.71 against 0.91 ms and
# 0.86 against 1.85 ms over the four stages).
CONFIGS = {
    "stats": (16, 16, 4, 1),
    "weighted": (2, 64, 1, 1),
    "backward_reduce": (16, 16, 4, 1),
    "backward_features": (16, 16, 4, 16),
    "backward_input": (2, 64, 1, 1),
}
# Under 16-bit autocast ("tf32" products) these kernels compute f as one matrix product per channel, (positions
# x taps) @ (taps x k), with their own tiles; otherwise, and in the other kernels, f is 9 broadcast multiply-adds.
# The products won where they replace the statistics' and the reduction pass's multiply-adds (docs/BENCHMARKS.md).
# The passes then see f rounded differently (TF32 products vs float32 multiply-adds), far below autocast's own
# 16-bit rounding of it. A product needs at least 16 positions; 8 channels per tile won on the H200.
DOT_CONFIGS = {"stats": (64, 8, 4, 1), "backward_reduce": (16, 8, 1, 1)}
# Positions and image sides only mask tiles and locate neighbours: not specialised, so one compiled variant serves
# every batch and image size (and every stage whose C Triton finds divisible by 16, which aligns the channel loads).
IMAGE_SIZES = ["P", "H", "W"]


# Every tensor inside the kernels is rank 3, (positions, k, channels), with size-1 axes where a value does not
# depend on one, so that all of them broadcast against each other without reshapes.


@triton.jit
def _positions(pid_p, P, H, W, BLOCK_P: tl.constexpr):
    """Offsets (BLOCK_P, 1, 1) of this tile's positions, their image, row and column, and the mask."""
    offs_p = (pid_p * BLOCK_P + tl.arange(0, BLOCK_P))[:, None, None]
    w = offs_p % W
    h = (offs_p // W) % H
    b = offs_p // (W * H)
    return offs_p, b, h, w, offs_p < P


@triton.jit
def _channels(C, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """Channel offsets (1, 1, BLOCK_C) and mask, k offsets (1, BLOCK_K, 1), and the (1, BLOCK_K, BLOCK_C)
    offsets and mask of per-(k, c) vectors."""
    offs_c = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C))[None, None, :]
    offs_k = tl.arange(0, BLOCK_K)[None, :, None]
    mask_c = offs_c < C
    return offs_c, mask_c, offs_k, offs_k * C + offs_c, (offs_k < 9) & mask_c


@triton.jit
def _neighbour(x_ptr, b, h, w, offs_c, mask_p, mask_c, H, W, C, dh: tl.constexpr, dw: tl.constexpr):
    """x at (h + dh, w + dw) of the same image, zero outside it: (BLOCK_P, 1, BLOCK_C) float32."""
    hh = h + dh
    ww = w + dw
    valid = mask_p & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
    return tl.load(x_ptr + ((b * H + hh) * W + ww) * C + offs_c, mask=valid & mask_c, other=0.0).to(tl.float32)


@triton.jit
def _neighbourhood(x_ptr, b, h, w, offs_c, taps, mask_p, mask_c, H, W, C):
    """The 3x3 neighbourhood of every position, tap j = 3 * (dh + 1) + (dw + 1) on axis 1, zero outside the
    image and for padded taps: (BLOCK_P, BLOCK_K, BLOCK_C) float32."""
    hh = h + taps // 3 - 1
    ww = w + taps % 3 - 1
    valid = mask_p & (taps < 9) & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
    return tl.load(x_ptr + ((b * H + hh) * W + ww) * C + offs_c, mask=valid & mask_c, other=0.0).to(tl.float32)


@triton.jit
def _features(x_ptr, wf_ptr, b, h, w, offs_c, offs_k, mask_p, mask_c, index_kc, mask_kc, H, W, C,
              BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
              F_BY_DOT: tl.constexpr):
    """f (BLOCK_P, BLOCK_K, BLOCK_C) and the 3x3 average pool of x (BLOCK_P, 1, BLOCK_C), both float32."""
    if F_BY_DOT:
        # per channel, (positions x taps) @ (taps x k)
        neighbours = _neighbourhood(x_ptr, b, h, w, offs_c, offs_k, mask_p, mask_c, H, W, C)
        taps = tl.arange(0, BLOCK_K)[:, None, None]
        wf = tl.load(wf_ptr + taps * (9 * C) + index_kc, mask=(taps < 9) & mask_kc, other=0.0).to(tl.float32)
        f = tl.dot(tl.permute(neighbours, (2, 0, 1)), tl.permute(wf, (2, 0, 1)), input_precision=PRECISION)
        return tl.permute(f, (1, 2, 0)), tl.sum(neighbours, axis=1, keep_dims=True) / 9.0
    f = tl.zeros([BLOCK_P, BLOCK_K, BLOCK_C], dtype=tl.float32)
    box = tl.zeros([BLOCK_P, 1, BLOCK_C], dtype=tl.float32)
    for j in tl.static_range(9):
        n = _neighbour(x_ptr, b, h, w, offs_c, mask_p, mask_c, H, W, C, j // 3 - 1, j % 3 - 1)
        f += n * tl.load(wf_ptr + j * 9 * C + index_kc, mask=mask_kc, other=0.0)
        box += n
    return f, box / 9.0


@triton.jit
def _softmax_weights(pooled, wc_ptr, offs_k, index_kc, mask_kc):
    """softmax over k of pooled * wc[k, c] (BLOCK_P, BLOCK_K, BLOCK_C); padded k get weight 0."""
    wc = tl.load(wc_ptr + index_kc, mask=mask_kc, other=0.0)
    # padded k only (every column keeps 9 finite logits, so padded channels give no NaN)
    logits = tl.where(offs_k < 9, pooled * wc, float("-inf"))
    e = tl.exp(logits - tl.max(logits, axis=1, keep_dims=True))
    return e / tl.sum(e, axis=1, keep_dims=True), wc


@triton.jit
def _recompute(x_ptr, wf_ptr, wc_ptr, scale, shift, b, h, w, offs_c, offs_k, mask_p, mask_c, index_kc, mask_kc,
               H, W, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
               F_BY_DOT: tl.constexpr):
    """From x: f, the pooled input, the softmax weights and their wc, and the batch-norm output y."""
    f, pooled = _features(x_ptr, wf_ptr, b, h, w, offs_c, offs_k, mask_p, mask_c, index_kc, mask_kc, H, W, C,
                          BLOCK_P, BLOCK_C, BLOCK_K, PRECISION, F_BY_DOT)
    s, wc = _softmax_weights(pooled, wc_ptr, offs_k, index_kc, mask_kc)
    return f, pooled, s, wc, f * scale + shift


@triton.jit(do_not_specialize=IMAGE_SIZES)
def _stats_kernel(x_ptr, wf_ptr, sum_ptr, sumsq_ptr, P, H, W, C, TILES: tl.constexpr,
                  BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
                  F_BY_DOT: tl.constexpr):
    offs_c, mask_c, offs_k, index_kc, mask_kc = _channels(C, BLOCK_C, BLOCK_K)
    total = tl.zeros([1, BLOCK_K, BLOCK_C], dtype=tl.float32)
    total_sq = tl.zeros([1, BLOCK_K, BLOCK_C], dtype=tl.float32)
    for t in range(TILES):
        offs_p, b, h, w, mask_p = _positions(tl.program_id(0) * TILES + t, P, H, W, BLOCK_P)
        f, _ = _features(x_ptr, wf_ptr, b, h, w, offs_c, offs_k, mask_p, mask_c, index_kc, mask_kc, H, W, C,
                         BLOCK_P, BLOCK_C, BLOCK_K, PRECISION, F_BY_DOT)
        total += tl.sum(f, axis=0, keep_dims=True)
        total_sq += tl.sum(f * f, axis=0, keep_dims=True)
    tl.atomic_add(sum_ptr + index_kc, total, mask=mask_kc)
    tl.atomic_add(sumsq_ptr + index_kc, total_sq, mask=mask_kc)


@triton.jit(do_not_specialize=IMAGE_SIZES)
def _weighted_kernel(x_ptr, wf_ptr, wc_ptr, scale_ptr, shift_ptr, out_ptr, P, H, W, C, TILES: tl.constexpr,
                     BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
                     F_BY_DOT: tl.constexpr):
    """weighted = relu(f * scale + shift) * softmax weights, stored as (P, 9, C)."""
    offs_c, mask_c, offs_k, index_kc, mask_kc = _channels(C, BLOCK_C, BLOCK_K)
    scale = tl.load(scale_ptr + index_kc, mask=mask_kc, other=0.0)
    shift = tl.load(shift_ptr + index_kc, mask=mask_kc, other=0.0)
    for t in range(TILES):
        offs_p, b, h, w, mask_p = _positions(tl.program_id(0) * TILES + t, P, H, W, BLOCK_P)
        _, _, s, _, y = _recompute(x_ptr, wf_ptr, wc_ptr, scale, shift, b, h, w, offs_c, offs_k, mask_p, mask_c,
                                   index_kc, mask_kc, H, W, C, BLOCK_P, BLOCK_C, BLOCK_K, PRECISION, F_BY_DOT)
        weighted = tl.maximum(y, 0.0) * s
        tl.store(out_ptr + offs_p * (9 * C) + index_kc, weighted.to(out_ptr.dtype.element_ty),
                 mask=mask_p & mask_kc)


@triton.jit(do_not_specialize=IMAGE_SIZES)
def _backward_reduce_kernel(x_ptr, wf_ptr, wc_ptr, scale_ptr, shift_ptr, grad_weighted_ptr, grad_pooled_ptr,
                            grad_y_sum_ptr, grad_y_f_sum_ptr, grad_wc_ptr, P, H, W, C, TILES: tl.constexpr,
                            BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                            PRECISION: tl.constexpr, F_BY_DOT: tl.constexpr):
    """Gradient of the pooled input; per-(k, c) sums of dL/dy, dL/dy * f and dL/dwc."""
    offs_c, mask_c, offs_k, index_kc, mask_kc = _channels(C, BLOCK_C, BLOCK_K)
    scale = tl.load(scale_ptr + index_kc, mask=mask_kc, other=0.0)
    shift = tl.load(shift_ptr + index_kc, mask=mask_kc, other=0.0)
    grad_y_sum = tl.zeros([1, BLOCK_K, BLOCK_C], dtype=tl.float32)
    grad_y_f_sum = tl.zeros([1, BLOCK_K, BLOCK_C], dtype=tl.float32)
    grad_wc = tl.zeros([1, BLOCK_K, BLOCK_C], dtype=tl.float32)
    for t in range(TILES):
        offs_p, b, h, w, mask_p = _positions(tl.program_id(0) * TILES + t, P, H, W, BLOCK_P)
        f, pooled, s, wc, y = _recompute(x_ptr, wf_ptr, wc_ptr, scale, shift, b, h, w, offs_c, offs_k, mask_p,
                                         mask_c, index_kc, mask_kc, H, W, C, BLOCK_P, BLOCK_C, BLOCK_K, PRECISION,
                                         F_BY_DOT)
        grad_weighted = tl.load(grad_weighted_ptr + offs_p * (9 * C) + index_kc, mask=mask_p & mask_kc,
                                other=0.0).to(tl.float32)
        grad_y = tl.where(y > 0, grad_weighted * s, 0.0)
        grad_y_sum += tl.sum(grad_y, axis=0, keep_dims=True)
        grad_y_f_sum += tl.sum(grad_y * f, axis=0, keep_dims=True)
        grad_s = grad_weighted * tl.maximum(y, 0.0)
        grad_logits = s * (grad_s - tl.sum(s * grad_s, axis=1, keep_dims=True))
        grad_wc += tl.sum(grad_logits * pooled, axis=0, keep_dims=True)
        tl.store(grad_pooled_ptr + offs_p * C + offs_c, tl.sum(grad_logits * wc, axis=1, keep_dims=True),
                 mask=mask_p & mask_c)
    tl.atomic_add(grad_y_sum_ptr + index_kc, grad_y_sum, mask=mask_kc)
    tl.atomic_add(grad_y_f_sum_ptr + index_kc, grad_y_f_sum, mask=mask_kc)
    tl.atomic_add(grad_wc_ptr + index_kc, grad_wc, mask=mask_kc)


@triton.jit(do_not_specialize=IMAGE_SIZES)
def _backward_features_kernel(x_ptr, wf_ptr, wc_ptr, scale_ptr, shift_ptr, grad_weighted_ptr, coef_y_ptr,
                              coef_f_ptr, coef_1_ptr, grad_f_ptr, grad_wf_ptr, P, H, W, C, TILES: tl.constexpr,
                              BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                              PRECISION: tl.constexpr, F_BY_DOT: tl.constexpr):
    """dL/df = coef_y * dL/dy + coef_f * f + coef_1 (the batch-norm backward), stored as (P, 9, C); dL/dwf, per
    channel the matrix product (taps x positions) @ (positions x k) accumulated over the program's tiles."""
    offs_c, mask_c, offs_k, index_kc, mask_kc = _channels(C, BLOCK_C, BLOCK_K)
    scale = tl.load(scale_ptr + index_kc, mask=mask_kc, other=0.0)
    shift = tl.load(shift_ptr + index_kc, mask=mask_kc, other=0.0)
    coef_y = tl.load(coef_y_ptr + index_kc, mask=mask_kc, other=0.0)
    coef_f = tl.load(coef_f_ptr + index_kc, mask=mask_kc, other=0.0)
    coef_1 = tl.load(coef_1_ptr + index_kc, mask=mask_kc, other=0.0)
    grad_wf = tl.zeros([BLOCK_C, BLOCK_K, BLOCK_K], dtype=tl.float32)
    for t in range(TILES):
        offs_p, b, h, w, mask_p = _positions(tl.program_id(0) * TILES + t, P, H, W, BLOCK_P)
        f, _, s, _, y = _recompute(x_ptr, wf_ptr, wc_ptr, scale, shift, b, h, w, offs_c, offs_k, mask_p, mask_c,
                                   index_kc, mask_kc, H, W, C, BLOCK_P, BLOCK_C, BLOCK_K, PRECISION, F_BY_DOT)
        mask = mask_p & mask_kc
        offsets = offs_p * (9 * C) + index_kc
        grad_weighted = tl.load(grad_weighted_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        grad_y = tl.where(y > 0, grad_weighted * s, 0.0)
        grad_f = tl.where(mask, coef_y * grad_y + coef_f * f + coef_1, 0.0)
        tl.store(grad_f_ptr + offsets, grad_f.to(grad_f_ptr.dtype.element_ty), mask=mask)
        neighbours = _neighbourhood(x_ptr, b, h, w, offs_c, offs_k, mask_p, mask_c, H, W, C)
        grad_wf = tl.dot(tl.permute(neighbours, (2, 1, 0)), tl.permute(grad_f, (2, 0, 1)), grad_wf,
                         input_precision=PRECISION)
    # (channel, tap, k) -> grad_wf[tap, k, channel]
    channel = offs_c.reshape(BLOCK_C, 1, 1)
    tap = tl.arange(0, BLOCK_K)[None, :, None]
    k = tl.arange(0, BLOCK_K)[None, None, :]
    tl.atomic_add(grad_wf_ptr + tap * (9 * C) + k * C + channel, grad_wf,
                  mask=(tap < 9) & (k < 9) & (channel < C))


@triton.jit(do_not_specialize=IMAGE_SIZES)
def _backward_input_kernel(wf_ptr, grad_f_ptr, grad_pooled_ptr, grad_x_ptr, P, H, W, C, TILES: tl.constexpr,
                           BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """dL/dx: the transposed grouped conv of dL/df plus the transposed 3x3 average pool of dL/dpooled."""
    offs_c, mask_c, offs_k, index_kc, mask_kc = _channels(C, BLOCK_C, BLOCK_K)
    for t in range(TILES):
        offs_p, b, h, w, mask_p = _positions(tl.program_id(0) * TILES + t, P, H, W, BLOCK_P)
        grad_x = tl.zeros([BLOCK_P, 1, BLOCK_C], dtype=tl.float32)
        for j in tl.static_range(9):
            # x[p] fed f at p - offset_j through tap j
            hh = h - (j // 3 - 1)
            ww = w - (j % 3 - 1)
            valid = mask_p & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
            rows = (b * H + hh) * W + ww
            grad_f = tl.load(grad_f_ptr + rows * (9 * C) + index_kc, mask=valid & mask_kc, other=0.0)
            wj = tl.load(wf_ptr + j * 9 * C + index_kc, mask=mask_kc, other=0.0)
            grad_x += tl.sum(grad_f.to(tl.float32) * wj, axis=1, keep_dims=True)
            grad_x += tl.load(grad_pooled_ptr + rows * C + offs_c, mask=valid & mask_c, other=0.0) / 9.0
        tl.store(grad_x_ptr + offs_p * C + offs_c, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask_p & mask_c)


def products_precision(compute_dtype: torch.dtype) -> str:
    """How the kernels' matrix products treat float32 operands: exactly without autocast; as TF32 under 16-bit
    autocast, still finer than the bf16/fp16 convolutions that autocast would run there."""
    return "tf32" if compute_dtype in (torch.float16, torch.bfloat16) else "ieee"


def _by_dot(name: str, precision: str | None) -> bool:
    """Whether kernel ``name`` computes f as matrix products (and launches with its DOT_CONFIGS tile)."""
    return precision == "tf32" and name in DOT_CONFIGS


def launch_tile(name: str, precision: str | None) -> tuple[int, int, int, int]:
    """(positions per tile, channels per tile, warps, tiles per program) that kernel ``name`` launches with."""
    return DOT_CONFIGS[name] if _by_dot(name, precision) else CONFIGS[name]


def _launch(name: str, kernel, num_positions: int, channels: int, *args, precision: str | None = None) -> None:
    """Launch ``kernel`` with ``name``'s tiles; ``precision`` for kernels that compute f."""
    by_dot = _by_dot(name, precision)
    block_p, block_c, num_warps, tiles = launch_tile(name, precision)
    meta = {} if precision is None else {"PRECISION": precision, "F_BY_DOT": by_dot}
    grid = (triton.cdiv(num_positions, block_p * tiles), triton.cdiv(channels, block_c))
    kernel[grid](*args, TILES=tiles, BLOCK_P=block_p, BLOCK_C=block_c, BLOCK_K=BLOCK_K, num_warps=num_warps, **meta)


def feature_statistics(x: torch.Tensor, wf: torch.Tensor, precision: str = "ieee"
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum and sum of squares of f over all positions, each (9, C) float32."""
    b, h, w, c = x.shape
    total = torch.zeros(POSITIONS, c, device=x.device, dtype=torch.float32)
    total_sq = torch.zeros_like(total)
    _launch("stats", _stats_kernel, b * h * w, c, x, wf, total, total_sq, b * h * w, h, w, c, precision=precision)
    return total, total_sq


def weighted_features(x: torch.Tensor, wf: torch.Tensor, wc: torch.Tensor, scale: torch.Tensor,
                      shift: torch.Tensor, dtype: torch.dtype, precision: str = "ieee") -> torch.Tensor:
    """relu(f * scale + shift) * softmax weights as (P, 9C) in ``dtype``, column k * C + c."""
    b, h, w, c = x.shape
    out = torch.empty(b * h * w, POSITIONS * c, device=x.device, dtype=dtype)
    _launch("weighted", _weighted_kernel, b * h * w, c, x, wf, wc, scale, shift, out, b * h * w, h, w, c,
            precision=precision)
    return out


def backward_reduce(x, wf, wc, scale, shift, grad_weighted, precision: str = "ieee"):
    """(dL/dpooled (P, C), sum dL/dy, sum dL/dy * f, dL/dwc), float32; the last three (9, C)."""
    b, h, w, c = x.shape
    sums = torch.zeros(3, POSITIONS, c, device=x.device, dtype=torch.float32)
    grad_pooled = torch.empty(b * h * w, c, device=x.device, dtype=torch.float32)
    _launch("backward_reduce", _backward_reduce_kernel, b * h * w, c, x, wf, wc, scale, shift, grad_weighted,
            grad_pooled, sums[0], sums[1], sums[2], b * h * w, h, w, c, precision=precision)
    return grad_pooled, sums[0], sums[1], sums[2]


def backward_features(x, wf, wc, scale, shift, grad_weighted, coef_y, coef_f, coef_1, precision: str = "ieee"):
    """(dL/df (P, 9C) in grad_weighted's dtype, dL/dwf (9, 9, C) float32)."""
    b, h, w, c = x.shape
    grad_f = torch.empty_like(grad_weighted)
    grad_wf = torch.zeros(9, POSITIONS, c, device=x.device, dtype=torch.float32)
    _launch("backward_features", _backward_features_kernel, b * h * w, c, x, wf, wc, scale, shift, grad_weighted,
            coef_y, coef_f, coef_1, grad_f, grad_wf, b * h * w, h, w, c, precision=precision)
    return grad_f, grad_wf


def backward_input(x, wf, grad_f, grad_pooled) -> torch.Tensor:
    """dL/dx (B, H, W, C) in x's dtype."""
    b, h, w, c = x.shape
    grad_x = torch.empty_like(x)
    _launch("backward_input", _backward_input_kernel, b * h * w, c, wf, grad_f, grad_pooled, grad_x, b * h * w,
            h, w, c)
    return grad_x
