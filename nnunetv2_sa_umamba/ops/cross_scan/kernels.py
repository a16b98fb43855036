"""SS2D's cross-scan and cross-merge as Triton kernels: one pass each instead of transposes, flips and adds.

cross-scan:  x (B, H, W, D) channel-last -> xs (B, 4, D, L), L = H*W, directions: row-major, column-major,
             reversed row-major, reversed column-major.
cross-merge: ys (B, 4, D, L) -> y (B, H, W, D), the sum of the four directions back in row-major order.
Each is the other's adjoint, so each one's backward is the other.

A program handles one line of an image (a row for directions 0 and 2, a column for 1 and 3) and a block of
channels: it reads the line channel-contiguous from the (B, H, W, D) side and writes it position-contiguous on
the (B, 4, D, L) side, so both sides are accessed in runs. Merging runs the row lines first and adds the column
lines in a second launch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# chosen for the stage-1 and stage-4 shapes of a 28 x 256 x 256 batch
BLOCK_D = 64
MAX_BLOCK_N = 64  # positions per chunk of a line
NUM_WARPS = 4
# Not specialised: they locate the line and the direction (a stride or direction of 1 would otherwise make the row
# and the column pass two compiled variants), while n, D and L, which align the vector loads and stores, stay so.
LINE_GEOMETRY = ["num_lines", "stride_i", "stride_j", "k_forward", "k_reversed"]


@triton.jit
def _line(pid, num_lines, n, stride_i, stride_j, chunk, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, D):
    """Image b, (BLOCK_N, 1) positions p (row-major index inside the image) and scan indices pos of this chunk of
    the line, their mask; (1, BLOCK_D) channels and mask."""
    b = pid // num_lines
    i = pid % num_lines
    j = chunk * BLOCK_N + tl.arange(0, BLOCK_N)[:, None]
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)[None, :]
    return b, i * stride_i + j * stride_j, i * n + j, j < n, offs_d, offs_d < D


@triton.jit(do_not_specialize=LINE_GEOMETRY)
def _scan_kernel(x_ptr, xs_ptr, num_lines, n, stride_i, stride_j, D, L, k_forward, k_reversed,
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    for chunk in range(tl.cdiv(n, BLOCK_N)):
        b, p, pos, mask_n, offs_d, mask_d = _line(tl.program_id(0), num_lines, n, stride_i, stride_j, chunk,
                                                  BLOCK_N, BLOCK_D, D)
        mask = mask_n & mask_d
        values = tl.load(x_ptr + (b * L + p) * D + offs_d, mask=mask).to(xs_ptr.dtype.element_ty)
        tl.store(xs_ptr + ((b * 4 + k_forward) * D + offs_d) * L + pos, values, mask=mask)
        tl.store(xs_ptr + ((b * 4 + k_reversed) * D + offs_d) * L + (L - 1 - pos), values, mask=mask)


@triton.jit(do_not_specialize=LINE_GEOMETRY)
def _merge_kernel(ys_ptr, y_ptr, num_lines, n, stride_i, stride_j, D, L, k_forward, k_reversed,
                  ACCUMULATE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    for chunk in range(tl.cdiv(n, BLOCK_N)):
        b, p, pos, mask_n, offs_d, mask_d = _line(tl.program_id(0), num_lines, n, stride_i, stride_j, chunk,
                                                  BLOCK_N, BLOCK_D, D)
        mask = mask_n & mask_d
        total = tl.load(ys_ptr + ((b * 4 + k_forward) * D + offs_d) * L + pos, mask=mask).to(tl.float32)
        total += tl.load(ys_ptr + ((b * 4 + k_reversed) * D + offs_d) * L + (L - 1 - pos), mask=mask).to(tl.float32)
        out_ptrs = y_ptr + (b * L + p) * D + offs_d
        if ACCUMULATE:
            total += tl.load(out_ptrs, mask=mask).to(tl.float32)
        tl.store(out_ptrs, total.to(y_ptr.dtype.element_ty), mask=mask)


def _orientations(h: int, w: int):
    """(lines per image, positions per line, position stride between lines, along a line, directions)."""
    return ((h, w, w, 1, 0, 2),   # rows: directions 0 and 2
            (w, h, 1, w, 1, 3))   # columns: directions 1 and 3


def _launch(kernel, b: int, d: int, num_lines: int, n: int, *args, **meta) -> None:
    block_n = min(MAX_BLOCK_N, triton.next_power_of_2(n))
    grid = (b * num_lines, triton.cdiv(d, BLOCK_D))
    kernel[grid](*args, BLOCK_N=block_n, BLOCK_D=BLOCK_D, num_warps=NUM_WARPS, **meta)


def cross_scan(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, H, W, D) contiguous -> (B, 4, D, H*W) in ``dtype``."""
    b, h, w, d = x.shape
    xs = torch.empty(b, 4, d, h * w, device=x.device, dtype=dtype)
    for num_lines, n, stride_i, stride_j, k_forward, k_reversed in _orientations(h, w):
        _launch(_scan_kernel, b, d, num_lines, n, x, xs, num_lines, n, stride_i, stride_j, d, h * w, k_forward,
                k_reversed)
    return xs


def cross_merge(ys: torch.Tensor, h: int, w: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, 4, D, H*W) contiguous -> (B, H, W, D) in ``dtype``."""
    b, _, d, _ = ys.shape
    y = torch.empty(b, h, w, d, device=ys.device, dtype=dtype)
    for accumulate, (num_lines, n, stride_i, stride_j, k_forward, k_reversed) in enumerate(_orientations(h, w)):
        _launch(_merge_kernel, b, d, num_lines, n, ys, y, num_lines, n, stride_i, stride_j, d, h * w, k_forward,
                k_reversed, ACCUMULATE=bool(accumulate))
    return y
