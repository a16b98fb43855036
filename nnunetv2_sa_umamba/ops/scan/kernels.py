"""The selective scan as Triton kernels (the ``triton`` backend's, ops/scan/triton_backend.py): forward and
backward, no compile step.

Same semantics as ops/scan/reference.py (mamba-ssm's ``selective_scan_fn`` without ``z``). Each program scans a
block of channels of one batch element that share one group of B and C, over the sequence in chunks: a chunk
is a (channels, N, steps) tile whose recurrence h_t = a_t h_{t-1} + b_t is one ``tl.associative_scan`` along
the steps, started from the state carried over from the previous chunk. Where mamba-ssm's kernel runs one
channel per thread block, a program here holds several channels, so B, C and their gradients are loaded and
reduced over those channels in registers: the backward's dB and dC meet in 1/BLOCK_D as many atomic adds,
and short sequences (the 8 x 8 and 16 x 16 stages) keep every thread busy.

The backward first reruns the forward to store the state at every chunk start (nothing is kept from the
forward but its inputs), then walks the chunks backwards: it rebuilds the chunk's states from its start
state, runs the adjoint recurrence x_t = g_t + a_{t+1} x_{t+1} (g_t = dL/dy_t * C_t) as a reversed scan,
and forms every gradient from x, h and the inputs. a_t h_{t-1} is taken as h_t - b_t, so no division by a
decay is needed. All arithmetic is float32.
"""
from __future__ import annotations

import inspect

import torch
import triton
import triton.language as tl

LOG2_E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * log2(e)), as mamba-ssm computes it
SOFTPLUS_THRESHOLD = tl.constexpr(20.0)  # as mamba-ssm and F.softplus: above it softplus(x) = x
# Tile sizes: steps per chunk and channels per program, chosen so that a tile holds about TILE_ELEMENTS
# state values (channels x N x steps) and the block's channels share one group of B and C; the values won a
# sweep over SS2D's four scan shapes (docs/BENCHMARKS.md).
MAX_BLOCK_L = 32
TILE_ELEMENTS = 4096
# The chunk count only bounds the loop over chunks (the sequence length, which aligns the loads, stays specialised):
# its divisibility by 16 is not specialised, so the four scan lengths of a large image share one compiled variant. A
# single chunk still is (Triton then drops the loop); Triton before 3.2 lacks the option and specialises both.
CHUNK_COUNT = ({"do_not_specialize_on_alignment": ["n_chunks"]}
               if "do_not_specialize_on_alignment" in inspect.signature(triton.jit).parameters else {})


@triton.jit
def _linear_recurrence(a1, b1, a2, b2):
    # (a1, b1) then (a2, b2): h -> a2 (a1 h + b1) + b2. Reversed, the scan gives x_t = b_t + a_t x_{t+1}.
    return a1 * a2, b1 * a2 + b2


@triton.jit
def _delta(delta_ptr, row, offs_l, mask_l, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """(delta + bias, softplus of it) for a (BLOCK_D, BLOCK_L) tile; 0 on masked steps (no decay, no input)."""
    raw = tl.load(delta_ptr + row + offs_l, mask=mask_l, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw += bias
    dt = raw
    if SOFTPLUS:
        # log1p(e) to float32 precision: log(1 + e) alone loses it for small e (the dt bias starts near -7)
        e = tl.exp(raw)
        w = 1.0 + e
        log1p = tl.where(w == 1.0, e, tl.log(w) * (e / (w - 1.0)))
        dt = tl.where(raw <= SOFTPLUS_THRESHOLD, log1p, raw)
    return raw, tl.where(mask_l, dt, 0.0)


@triton.jit
def _chunk_states(u, dt, A2, B, h_start):
    """States of one chunk (BLOCK_D, N, BLOCK_L) and the inputs b = dt u B that built them."""
    a = tl.exp2(dt[:, None, :] * A2[:, :, None])
    b = (dt * u)[:, None, :] * B[None, :, :]
    decay, h = tl.associative_scan((a, b), 2, _linear_recurrence)
    return h + decay * h_start[:, :, None], a, b


@triton.jit
def _last_step(t, BLOCK_L: tl.constexpr):
    """t[:, :, BLOCK_L - 1] of a (BLOCK_D, N, BLOCK_L) tile."""
    last = tl.arange(0, BLOCK_L)[None, None, :] == BLOCK_L - 1
    return tl.sum(tl.where(last, t, 0.0), axis=2)


@triton.jit
def _program_tiles(A_ptr, bias_ptr, channels, length, channels_per_group, groups,
                   HAS_BIAS: tl.constexpr, N: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's channels and batch element: channel offsets, A (BLOCK_D, N), delta's bias (BLOCK_D, 1) or 0,
    and the row offsets of its (channels, L) rows in u-shaped tensors and of its group's (N, L) rows of B and C."""
    batch = tl.program_id(1)
    offs_d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, N)
    group = (tl.program_id(0) * BLOCK_D) // channels_per_group
    A = tl.load(A_ptr + offs_d[:, None] * N + offs_n[None, :])
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d)[:, None]
    row = (batch * channels + offs_d)[:, None].to(tl.int64) * length
    bc_row = ((batch * groups + group) * N + offs_n)[:, None].to(tl.int64) * length
    return offs_d, offs_n, A, bias, row, bc_row


@triton.jit
def _state_offsets(offs_d, offs_n, channels, chunk, n_chunks, N: tl.constexpr):
    """Offsets (BLOCK_D, N) of the state at the start of ``chunk`` in the (batch, channels, n_chunks, N) buffer."""
    return ((tl.program_id(1) * channels + offs_d)[:, None].to(tl.int64) * n_chunks + chunk) * N + offs_n[None, :]


@triton.jit(**CHUNK_COUNT)
def _scan_forward_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, y_ptr, states_ptr,
                         channels, length, channels_per_group, groups, n_chunks,
                         HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                         WRITE_Y: tl.constexpr, WRITE_STATES: tl.constexpr,
                         N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    offs_d, offs_n, A, bias, row, bc_row = _program_tiles(A_ptr, bias_ptr, channels, length, channels_per_group,
                                                          groups, HAS_BIAS, N, BLOCK_D)
    A2 = A * LOG2_E
    h = tl.zeros([BLOCK_D, N], dtype=tl.float32)
    for chunk in range(n_chunks):
        offs_l = chunk * BLOCK_L + tl.arange(0, BLOCK_L)[None, :]
        mask_l = offs_l < length
        if WRITE_STATES:
            tl.store(states_ptr + _state_offsets(offs_d, offs_n, channels, chunk, n_chunks, N), h)
        u = tl.load(u_ptr + row + offs_l, mask=mask_l, other=0.0).to(tl.float32)
        _, dt = _delta(delta_ptr, row, offs_l, mask_l, bias, HAS_BIAS, SOFTPLUS)
        B = tl.load(B_ptr + bc_row + offs_l, mask=mask_l, other=0.0).to(tl.float32)
        states, _, _ = _chunk_states(u, dt, A2, B, h)
        if WRITE_Y:
            C = tl.load(C_ptr + bc_row + offs_l, mask=mask_l, other=0.0).to(tl.float32)
            y = tl.sum(states * C[None, :, :], axis=1)
            if HAS_D:
                y += tl.load(D_ptr + offs_d)[:, None] * u
            tl.store(y_ptr + row + offs_l, y.to(y_ptr.dtype.element_ty), mask=mask_l)
        h = _last_step(states, BLOCK_L)


@triton.jit(**CHUNK_COUNT)
def _scan_backward_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, dy_ptr, states_ptr,
                          du_ptr, ddelta_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr,
                          channels, length, channels_per_group, groups, n_chunks,
                          HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                          N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    offs_d, offs_n, A, bias, row, bc_row = _program_tiles(A_ptr, bias_ptr, channels, length, channels_per_group,
                                                          groups, HAS_BIAS, N, BLOCK_D)
    A2 = A * LOG2_E
    steps = tl.arange(0, BLOCK_L)[None, None, :]
    D = 0.0
    if HAS_D:
        D = tl.load(D_ptr + offs_d)[:, None]
    # dL/dh flowing into the last state of the chunk from the one after it: a_{t+1} x_{t+1}
    carry = tl.zeros([BLOCK_D, N], dtype=tl.float32)
    dA = tl.zeros([BLOCK_D, N], dtype=tl.float32)
    dD = tl.zeros([BLOCK_D, 1], dtype=tl.float32)
    dbias = tl.zeros([BLOCK_D, 1], dtype=tl.float32)
    for reversed_chunk in range(n_chunks):
        chunk = n_chunks - 1 - reversed_chunk
        offs_l = chunk * BLOCK_L + tl.arange(0, BLOCK_L)[None, :]
        mask_l = offs_l < length
        h_start = tl.load(states_ptr + _state_offsets(offs_d, offs_n, channels, chunk, n_chunks, N))
        u = tl.load(u_ptr + row + offs_l, mask=mask_l, other=0.0).to(tl.float32)
        raw, dt = _delta(delta_ptr, row, offs_l, mask_l, bias, HAS_BIAS, SOFTPLUS)
        B = tl.load(B_ptr + bc_row + offs_l, mask=mask_l, other=0.0).to(tl.float32)
        C = tl.load(C_ptr + bc_row + offs_l, mask=mask_l, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row + offs_l, mask=mask_l, other=0.0).to(tl.float32)
        states, a, b = _chunk_states(u, dt, A2, B, h_start)
        # a_{t+1} within the chunk; the last step takes the carry instead
        next_in_chunk = (offs_l + 1 < length) & (tl.arange(0, BLOCK_L)[None, :] < BLOCK_L - 1)
        _, dt_next = _delta(delta_ptr, row, offs_l + 1, next_in_chunk, bias, HAS_BIAS, SOFTPLUS)
        a_next = tl.exp2(dt_next[:, None, :] * A2[:, :, None])
        g = dy[:, None, :] * C[None, :, :] + tl.where(steps == BLOCK_L - 1, carry[:, :, None], 0.0)
        _, x = tl.associative_scan((a_next, g), 2, _linear_recurrence, reverse=True)
        carry = tl.sum(tl.where(steps == 0, a * x, 0.0), axis=2)

        x_h_prev = x * (states - b)  # x_t * a_t h_{t-1}
        x_B = tl.sum(x * B[None, :, :], axis=1)
        ddt = tl.sum(x_h_prev * A[:, :, None], axis=1) + u * x_B
        if SOFTPLUS:
            ddt = tl.where(raw <= SOFTPLUS_THRESHOLD, ddt / (1.0 + tl.exp(-raw)), ddt)
        ddt = tl.where(mask_l, ddt, 0.0)
        du = x_B * dt + D * dy
        tl.store(du_ptr + row + offs_l, du.to(du_ptr.dtype.element_ty), mask=mask_l)
        tl.store(ddelta_ptr + row + offs_l, ddt.to(ddelta_ptr.dtype.element_ty), mask=mask_l)
        dA += tl.sum(x_h_prev * dt[:, None, :], axis=2)
        dD += tl.sum(dy * u, axis=1, keep_dims=True)
        dbias += tl.sum(ddt, axis=1, keep_dims=True)
        # this program's channels summed in registers; the other programs of the group add theirs atomically
        mask_bc = mask_l & (offs_n[:, None] < N)
        tl.atomic_add(dB_ptr + bc_row + offs_l, tl.sum(x * (dt * u)[:, None, :], axis=0), mask=mask_bc)
        tl.atomic_add(dC_ptr + bc_row + offs_l, tl.sum(states * dy[:, None, :], axis=0), mask=mask_bc)
    tl.atomic_add(dA_ptr + offs_d[:, None] * N + offs_n[None, :], dA)
    if HAS_D:
        tl.atomic_add(dD_ptr + offs_d[:, None], dD)
    if HAS_BIAS:
        tl.atomic_add(dbias_ptr + offs_d[:, None], dbias)


def tile_shape(length: int, d_state: int, channels_per_group: int) -> tuple[int, int]:
    """(channels per program, steps per chunk): the channel count is a power of two dividing the group."""
    block_l = min(MAX_BLOCK_L, triton.next_power_of_2(length))
    block_d = max(1, TILE_ELEMENTS // (d_state * block_l))
    while channels_per_group % block_d:
        block_d //= 2
    return block_d, block_l


def _num_warps(block_d: int, d_state: int, block_l: int) -> int:
    return 4 if block_d * d_state * block_l >= 2048 else 2  # 4 was best for full tiles in the sweep


def _launch_geometry(u: torch.Tensor, A: torch.Tensor, B: torch.Tensor):
    batch, channels, length = u.shape
    d_state, groups = A.shape[1], B.shape[1]
    if d_state & (d_state - 1):
        raise ValueError(f"the triton selective scan needs a power-of-two state size N, got {d_state}")
    block_d, block_l = tile_shape(length, d_state, channels // groups)
    n_chunks = triton.cdiv(length, block_l)
    return (channels // block_d, batch), dict(channels=channels, length=length,
                                              channels_per_group=channels // groups, groups=groups,
                                              n_chunks=n_chunks), \
        dict(N=d_state, BLOCK_D=block_d, BLOCK_L=block_l, num_warps=_num_warps(block_d, d_state, block_l))


def _placeholder(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return like if t is None else t


def forward(u, delta, A, B, C, D, delta_bias, delta_softplus: bool) -> torch.Tensor:
    """y (batch, channels, L) in u's dtype. Inputs contiguous; A, D, delta_bias float32."""
    grid, sizes, meta = _launch_geometry(u, A, B)
    y = torch.empty_like(u)
    _scan_forward_kernel[grid](u, delta, A, B, C, _placeholder(D, A), _placeholder(delta_bias, A), y, y,
                               **sizes, HAS_D=D is not None, HAS_BIAS=delta_bias is not None,
                               SOFTPLUS=delta_softplus, WRITE_Y=True, WRITE_STATES=False, **meta)
    return y


def backward(dy, u, delta, A, B, C, D, delta_bias, delta_softplus: bool):
    """(du, ddelta, dA, dB, dC, dD, ddelta_bias); dD, ddelta_bias are None when D, delta_bias are."""
    grid, sizes, meta = _launch_geometry(u, A, B)
    batch, channels, _ = u.shape
    flags = dict(HAS_D=D is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus)
    state_shape = (batch, channels, sizes["n_chunks"], A.shape[1])
    if sizes["n_chunks"] == 1:  # the only chunk starts from the zero state: nothing to rerun
        states = torch.zeros(state_shape, device=u.device, dtype=torch.float32)
    else:
        states = torch.empty(state_shape, device=u.device, dtype=torch.float32)
        _scan_forward_kernel[grid](u, delta, A, B, C, _placeholder(D, A), _placeholder(delta_bias, A), u, states,
                                   **sizes, **flags, WRITE_Y=False, WRITE_STATES=True, **meta)
    du, ddelta = torch.empty_like(u), torch.empty_like(delta)
    dA = torch.zeros_like(A, dtype=torch.float32)
    dB = torch.zeros_like(B, dtype=torch.float32)
    dC = torch.zeros_like(C, dtype=torch.float32)
    dD = torch.zeros(channels, device=u.device, dtype=torch.float32)
    dbias = torch.zeros_like(dD)
    _scan_backward_kernel[grid](u, delta, A, B, C, _placeholder(D, A), _placeholder(delta_bias, A), dy, states,
                                du, ddelta, dA, dB, dC, dD, dbias, **sizes, **flags, **meta)
    return (du, ddelta, dA, dB.to(B.dtype), dC.to(C.dtype), None if D is None else dD,
            None if delta_bias is None else dbias)
