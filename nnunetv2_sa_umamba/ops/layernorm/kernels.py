"""LayerNorm over the last dimension, and SS2D's gate LayerNorm(y) * silu(z), as Triton kernels.

Every tensor is a (rows, C) view of a channel-last tensor: last dimension contiguous, one stride between rows
(so z may be a chunk of a wider tensor). A program handles a tile of BLOCK_ROWS whole rows, BLOCK_C the next power
of two >= C with the padding masked; the math is float32 whatever the input dtype.

forward:  out = (x - mean) * rstd * weight + bias            [gate: out *= silu(z)], mean and rstd per row kept
backward: recomputes the normalised x (and silu(z)) from x, z, mean and rstd; dx (and dz) per row; dweight and
          dbias summed over rows. For those sums each program handles a few consecutive row tiles, keeps their
          sums in registers and writes one partial row; torch then adds the partial rows. Unlike atomic adds
          this is deterministic, so it runs under torch.use_deterministic_algorithms too.

C is a compile-time constant: the masks of a padded row are then known to the compiler, which keeps the loads
and stores vectorised (SA-UMamba has a handful of row lengths, one compilation each).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Tiles: many rows per program for SA-UMamba's small C (24 at the last PatchExpand), where one row per program
# would leave most threads idle, one row once C reaches the tile's size. Forward and backward tiles differ: the
# backward's smaller tiles, more values per thread and two tiles per program won a sweep at stage 1's block norms
# (114688 x 96, docs/BENCHMARKS.md).
FORWARD_TILE_ELEMENTS = 4096
FORWARD_ELEMENTS_PER_THREAD = 16
BACKWARD_TILE_ELEMENTS = 2048
# the backward holds several tile-sized tensors in registers, yet more values per thread was faster there
BACKWARD_ELEMENTS_PER_THREAD = 32
# row tiles each backward program sums dweight and dbias over before writing its partial row
BACKWARD_TILES_PER_PROGRAM = 2
# The row count only masks the last tile, so Triton need not compile a variant per value class (divisible by 16 or
# not), which changes with batch and image size; the row strides stay specialised (they align the vector loads).
ROW_COUNT = ["rows"]


def _tile_rows_and_warps(block_c: int, tile_elements: int, elements_per_thread: int) -> tuple[int, int]:
    block_rows = max(1, tile_elements // block_c)
    return block_rows, min(8, max(1, block_rows * block_c // (32 * elements_per_thread)))


def tile_shape(channels: int) -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_C, num_warps) of the forward for rows of ``channels`` values."""
    block_c = triton.next_power_of_2(channels)
    block_rows, num_warps = _tile_rows_and_warps(block_c, FORWARD_TILE_ELEMENTS, FORWARD_ELEMENTS_PER_THREAD)
    return block_rows, block_c, num_warps


def backward_tile_shape(channels: int) -> tuple[int, int, int, int]:
    """(BLOCK_ROWS, BLOCK_C, num_warps, row tiles per program) of the backward."""
    block_c = triton.next_power_of_2(channels)
    block_rows, num_warps = _tile_rows_and_warps(block_c, BACKWARD_TILE_ELEMENTS, BACKWARD_ELEMENTS_PER_THREAD)
    return block_rows, block_c, num_warps, BACKWARD_TILES_PER_PROGRAM


@triton.jit
def _tile(block, rows, C, BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """Row offsets (BLOCK_ROWS,) and their mask, channel offsets (BLOCK_C,), the (BLOCK_ROWS, BLOCK_C) mask."""
    offs_r = block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    offs_c = tl.arange(0, BLOCK_C)
    mask_r = offs_r < rows
    return offs_r, mask_r, offs_c, mask_r[:, None] & (offs_c < C)[None, :]


@triton.jit
def _load(ptr, offs_r, offs_c, row_stride, mask):
    return tl.load(ptr + offs_r[:, None] * row_stride + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _silu(z, z_ptr):
    """silu(z) rounded to z's dtype as F.silu returns it (the product then uses the same factor), and
    sigmoid(z)."""
    sigmoid = tl.sigmoid(z)
    return (z * sigmoid).to(z_ptr.dtype.element_ty).to(tl.float32), sigmoid


@triton.jit(do_not_specialize=ROW_COUNT)
def _forward_kernel(x_ptr, z_ptr, weight_ptr, bias_ptr, out_ptr, mean_ptr, rstd_ptr, rows, C: tl.constexpr,
                    x_row_stride, z_row_stride, eps, GATE: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                    BLOCK_C: tl.constexpr):
    offs_r, mask_r, offs_c, mask = _tile(tl.program_id(0), rows, C, BLOCK_ROWS, BLOCK_C)
    x = _load(x_ptr, offs_r, offs_c, x_row_stride, mask)
    mean = tl.sum(x, axis=1) / C
    centred = tl.where(mask, x - mean[:, None], 0.0)
    # padded rows: variance 0, rstd finite, never stored
    rstd = tl.math.rsqrt(tl.sum(centred * centred, axis=1) / C + eps)
    weight = tl.load(weight_ptr + offs_c, mask=offs_c < C, other=0.0).to(tl.float32)[None, :]
    bias = tl.load(bias_ptr + offs_c, mask=offs_c < C, other=0.0).to(tl.float32)[None, :]
    out = centred * rstd[:, None] * weight + bias
    if GATE:
        silu, _ = _silu(_load(z_ptr, offs_r, offs_c, z_row_stride, mask), z_ptr)
        out = out * silu
    tl.store(out_ptr + offs_r[:, None] * C + offs_c[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + offs_r, mean, mask=mask_r)
    tl.store(rstd_ptr + offs_r, rstd, mask=mask_r)


@triton.jit(do_not_specialize=ROW_COUNT)
def _backward_kernel(grad_out_ptr, x_ptr, z_ptr, weight_ptr, bias_ptr, mean_ptr, rstd_ptr, grad_x_ptr, grad_z_ptr,
                     partial_weight_ptr, partial_bias_ptr, rows, C: tl.constexpr, grad_row_stride, x_row_stride,
                     z_row_stride, GATE: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
                     TILES_PER_PROGRAM: tl.constexpr):
    pid = tl.program_id(0)
    offs_c = tl.arange(0, BLOCK_C)
    weight = tl.load(weight_ptr + offs_c, mask=offs_c < C, other=0.0).to(tl.float32)[None, :]
    bias = tl.load(bias_ptr + offs_c, mask=offs_c < C, other=0.0).to(tl.float32)[None, :]
    grad_weight = tl.zeros([BLOCK_C], dtype=tl.float32)
    grad_bias = tl.zeros([BLOCK_C], dtype=tl.float32)
    # unrolled: the tiles' loads are independent, so they overlap
    for tile in tl.static_range(TILES_PER_PROGRAM):
        offs_r, mask_r, _, mask = _tile(pid * TILES_PER_PROGRAM + tile, rows, C, BLOCK_ROWS, BLOCK_C)
        mean = tl.load(mean_ptr + offs_r, mask=mask_r, other=0.0)[:, None]
        rstd = tl.load(rstd_ptr + offs_r, mask=mask_r, other=0.0)[:, None]
        x_hat = tl.where(mask, (_load(x_ptr, offs_r, offs_c, x_row_stride, mask) - mean) * rstd, 0.0)
        # dL/d(normalised output) before the affine map's weight
        grad_normed = _load(grad_out_ptr, offs_r, offs_c, grad_row_stride, mask)
        if GATE:
            z = _load(z_ptr, offs_r, offs_c, z_row_stride, mask)
            silu, sigmoid = _silu(z, z_ptr)
            grad_z = grad_normed * (x_hat * weight + bias) * sigmoid * (1.0 + z * (1.0 - sigmoid))
            tl.store(grad_z_ptr + offs_r[:, None] * C + offs_c[None, :], grad_z.to(grad_z_ptr.dtype.element_ty),
                     mask=mask)
            grad_normed = grad_normed * silu
        grad_weight += tl.sum(grad_normed * x_hat, axis=0)
        grad_bias += tl.sum(grad_normed, axis=0)
        grad_x_hat = grad_normed * weight
        mean_grad = tl.sum(grad_x_hat, axis=1)[:, None] / C
        mean_grad_x_hat = tl.sum(grad_x_hat * x_hat, axis=1)[:, None] / C
        grad_x = rstd * (grad_x_hat - mean_grad - x_hat * mean_grad_x_hat)
        tl.store(grad_x_ptr + offs_r[:, None] * C + offs_c[None, :], grad_x.to(grad_x_ptr.dtype.element_ty),
                 mask=mask)
    tl.store(partial_weight_ptr + pid * C + offs_c, grad_weight, mask=offs_c < C)
    tl.store(partial_bias_ptr + pid * C + offs_c, grad_bias, mask=offs_c < C)


def forward(x: torch.Tensor, z: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor, eps: float,
            out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, z (rows, C) with stride(1) == 1 -> (LayerNorm(x) [* silu(z)] (rows, C) contiguous in ``out_dtype``,
    mean, rstd (rows,) float32)."""
    rows, c = x.shape
    block_rows, block_c, num_warps = tile_shape(c)
    out = torch.empty(rows, c, device=x.device, dtype=out_dtype)
    mean = torch.empty(rows, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    gate = z is not None
    z = z if gate else x  # never read without the gate
    _forward_kernel[(triton.cdiv(rows, block_rows),)](
        x, z, weight, bias, out, mean, rstd, rows, c, x.stride(0), z.stride(0), eps, GATE=gate,
        BLOCK_ROWS=block_rows, BLOCK_C=block_c, num_warps=num_warps)
    return out, mean, rstd


def backward(grad_out: torch.Tensor, x: torch.Tensor, z: torch.Tensor | None, weight: torch.Tensor,
             bias: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor):
    """(dx in x's dtype, dz in z's dtype or None, dweight, dbias float32); grad_out, x, z (rows, C) with
    stride(1) == 1, dx and dz contiguous."""
    rows, c = x.shape
    block_rows, block_c, num_warps, tiles_per_program = backward_tile_shape(c)
    tiles_per_program = min(tiles_per_program, triton.cdiv(rows, block_rows))
    programs = triton.cdiv(rows, block_rows * tiles_per_program)
    grad_x = torch.empty(rows, c, device=x.device, dtype=x.dtype)
    gate = z is not None
    grad_z = torch.empty(rows, c, device=z.device, dtype=z.dtype) if gate else None
    partial_sums = torch.empty(2, programs, c, device=x.device, dtype=torch.float32)
    z_or_x = z if gate else x  # never read without the gate
    _backward_kernel[(programs,)](
        grad_out, x, z_or_x, weight, bias, mean, rstd, grad_x, grad_z if gate else grad_x, partial_sums[0],
        partial_sums[1], rows, c, grad_out.stride(0), x.stride(0), z_or_x.stride(0), GATE=gate,
        BLOCK_ROWS=block_rows, BLOCK_C=block_c, TILES_PER_PROGRAM=tiles_per_program, num_warps=num_warps)
    grad_weight, grad_bias = partial_sums.sum(1)
    return grad_x, grad_z, grad_weight, grad_bias
