"""The selective scan's forward as a Triton kernel that walks through time one step at a time, channels in parallel.

It stands in for mamba-ssm's forward (``selective_scan_cuda.fwd``) beside mamba-ssm's backward: it returns the same
``out`` and the same saved states ``x`` that the backward reads. Why: mamba-ssm gives each (batch, channel) a thread
block and splits the sequence over its threads, so every step needs a block-wide scan, and at SS2D's short sequences
(1024, 256 and 64 steps) a block has little work for its threads. Here a program holds the state h of BLOCK_D
channels that share one group of B and C as an (N, BLOCK_D) float32 tile in registers and updates it step by step:
h = exp2(dt A log2(e)) h + dt u B, y_t = sum_n h C + D u. Nothing is scanned across threads; the sequential chain is
one multiply-add per step. (mamba-ssm's backward stays: a step-by-step backward was slower, docs/BENCHMARKS.md.)

u, delta and y move in tiles of N steps x BLOCK_D channels, the state's shape, so that Triton gives tiles and state
one register layout and a step's column (taken out with a compile-time mask; the steps of a tile are unrolled)
broadcasts into the state without moving data between threads. B and C are read transposed, (L, N) per group: a
step's N values are one contiguous load shared by the program's threads.

``x`` as mamba-ssm 2.3.2's forward writes it: float32 (batch, channels, n_chunks, 2 N) with, at the end of every
chunk of 2048 steps, the pair (prod of exp(dt A) since the start, h) per state. Its backward reads the state of the
chunk before each chunk (csrc/selective_scan/selective_scan_bwd_kernel.cuh), so for L <= 2048 it reads nothing.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from nnunetv2_sa_umamba.ops.scan.kernels import LOG2_E, _delta

MAMBA_CHUNK = 2048  # steps per chunk of mamba-ssm's kernels: one saved state pair per chunk in x
# A program walks through all L steps with BLOCK_D channels in one warp. 16 channels per warp was the fastest or
# within 5 % of it at all four of SS2D's stages at batch 28 on an H200, against 8-128 channels in 1-4 warps
# (docs/BENCHMARKS.md); fewer channels per program also give small batches more programs.
CHANNELS_PER_PROGRAM = 16
# Sizes that only enter index arithmetic are not specialised; the sequence length is, as it aligns the tile loads.
RUNTIME_SIZES = ["channels", "channels_per_group", "groups", "n_chunks"]


@triton.jit
def _column(tile, s: tl.constexpr, N: tl.constexpr):
    """tile[s, :] of an (N, BLOCK_D) tile. -0.0 elsewhere: x + -0.0 == x, so the compiler drops the additions inside
    a thread and only the lanes that share a channel add theirs."""
    return tl.sum(tl.where(tl.arange(0, N)[:, None] == s, tile, -0.0), axis=0)


@triton.jit(do_not_specialize=RUNTIME_SIZES)
def _forward_kernel(u_ptr, delta_ptr, A_ptr, Bt_ptr, Ct_ptr, D_ptr, bias_ptr, y_ptr, x_ptr,
                    channels, length, channels_per_group, groups, n_chunks,
                    HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                    N: tl.constexpr, BLOCK_D: tl.constexpr, STATE_CHUNK: tl.constexpr):
    blocks_per_group = tl.cdiv(channels_per_group, BLOCK_D)
    group = tl.program_id(0) // blocks_per_group
    in_group = (tl.program_id(0) % blocks_per_group) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = in_group < channels_per_group
    offs_d = group * channels_per_group + in_group
    offs_n = tl.arange(0, N)
    batch = tl.program_id(1)
    A2 = tl.load(A_ptr + offs_d[None, :] * N + offs_n[:, None], mask=mask_d[None, :], other=0.0) * LOG2_E
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0)[None, :]
    D = 0.0
    if HAS_D:
        D = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0)[None, :]
    row = (batch * channels + offs_d).to(tl.int64) * length
    bc = (batch * groups + group).to(tl.int64) * length * N
    # x's pair (decay product, state) of state n sits at 2 n and 2 n + 1 of its chunk's row
    x_row = ((batch * channels + offs_d)[None, :].to(tl.int64) * n_chunks) * (2 * N) + 2 * offs_n[:, None]
    h = tl.zeros([N, BLOCK_D], dtype=tl.float32)
    dt_sum = tl.zeros([BLOCK_D], dtype=tl.float32)
    for t0 in range(0, length, N):
        offs_t = t0 + tl.arange(0, N)
        offs = tl.max_contiguous(row[None, :] + offs_t[:, None], [N, 1])
        mask = (offs_t < length)[:, None] & mask_d[None, :]
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        _, dt = _delta(delta_ptr, offs, 0, mask, bias, HAS_BIAS, SOFTPLUS)
        dtu = dt * u
        y = tl.zeros([N, BLOCK_D], dtype=tl.float32)
        for s in tl.static_range(N):
            step_ok = t0 + s < length
            B = tl.load(Bt_ptr + bc + (t0 + s) * N + offs_n, mask=step_ok, other=0.0).to(tl.float32)
            C = tl.load(Ct_ptr + bc + (t0 + s) * N + offs_n, mask=step_ok, other=0.0).to(tl.float32)
            h = tl.exp2(A2 * _column(dt, s, N)[None, :]) * h + B[:, None] * _column(dtu, s, N)[None, :]
            y = tl.where(tl.arange(0, N)[:, None] == s, tl.sum(h * C[:, None], axis=0)[None, :], y)
        tl.store(y_ptr + offs, (y + D * u).to(y_ptr.dtype.element_ty), mask=mask)
        dt_sum += tl.sum(dt, axis=0)
        t_end = t0 + N
        if (t_end % STATE_CHUNK == 0) | (t_end >= length):  # a chunk ends in this tile (STATE_CHUNK % N == 0)
            chunk_offs = x_ptr + x_row + ((t_end - 1) // STATE_CHUNK) * (2 * N)
            tl.store(chunk_offs, tl.exp2(A2 * dt_sum[None, :]), mask=mask_d[None, :])
            tl.store(chunk_offs + 1, h, mask=mask_d[None, :])


def launch_config(channels_per_group: int) -> tuple[int, int]:
    """Default (block_d, num_warps) for groups of ``channels_per_group`` channels."""
    return min(CHANNELS_PER_PROGRAM, triton.next_power_of_2(channels_per_group)), 1


def _grid(batch: int, channels: int, groups: int, block_d: int) -> tuple[int, int]:
    """(programs per batch element, batch): each program one walk with block_d channels of one group."""
    return groups * triton.cdiv(channels // groups, block_d), batch


def program_count(batch: int, channels: int, groups: int) -> int:
    """How many programs (sequential walks) the default launch runs."""
    per_batch, _ = _grid(batch, channels, groups, launch_config(channels // groups)[0])
    return per_batch * batch


def supports(d_state: int) -> bool:
    """Whether the kernel takes state size ``d_state``: a power of two of at least 2 (the tiles' height) and at most
    64 (the state lives in registers)."""
    return 2 <= d_state <= 64 and not d_state & (d_state - 1)


def forward(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
            D: torch.Tensor | None, delta_bias: torch.Tensor | None, delta_softplus: bool,
            state_chunk: int = MAMBA_CHUNK, block_d: int | None = None,
            num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, x) as mamba-ssm's ``selective_scan_cuda.fwd`` returns them without z: y (batch, channels, L) in u's dtype,
    x float32 (batch, channels, n_chunks, 2 N) for chunks of ``state_chunk`` steps (mamba-ssm's 2048; the tests use
    fewer). u, delta (batch, channels, L) and B, C (batch, groups, N, L) in one dtype; A (channels, N), D and
    delta_bias (channels,) float32. block_d, num_warps: ``launch_config``'s by default."""
    batch, channels, length = u.shape
    d_state, groups = A.shape[1], B.shape[1]
    if not supports(d_state):
        raise ValueError(f"the sequential forward scan needs a power-of-two state size in [2, 64], got {d_state}")
    if state_chunk % d_state:
        raise ValueError(f"state_chunk must be a multiple of the state size {d_state}, got {state_chunk}")
    default_block_d, default_warps = launch_config(channels // groups)
    block_d = block_d or default_block_d
    u, delta, A = u.contiguous(), delta.contiguous(), A.contiguous()
    # one (L, N) row per step for every group: a step's B is one contiguous load
    Bt, Ct = (t.transpose(-1, -2).contiguous() for t in (B, C))
    n_chunks = triton.cdiv(length, state_chunk)
    y = torch.empty_like(u)
    x = torch.empty((batch, channels, n_chunks, 2 * d_state), device=u.device, dtype=torch.float32)
    grid = _grid(batch, channels, groups, block_d)
    _forward_kernel[grid](u, delta, A, Bt, Ct, A if D is None else D, A if delta_bias is None else delta_bias, y, x,
                          channels, length, channels // groups, groups, n_chunks,
                          HAS_D=D is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
                          N=d_state, BLOCK_D=block_d, STATE_CHUNK=state_chunk,
                          num_warps=num_warps or default_warps)
    return y, x
