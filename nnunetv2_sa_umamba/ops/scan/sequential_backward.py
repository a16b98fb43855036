"""The selective scan's backward as a Triton kernel that walks through time one step at a time, channels in parallel.

The counterpart of ops/scan/sequential_forward.py, for short sequences, where mamba-ssm's backward (one thread block
per (batch, channel), the sequence split over its threads) has little work per block: at 64 steps (SS2D's deepest
stage at 256 x 256) it took 1.85 ms per scan at batch 28 on an H200, this kernel 0.95 (at 256 steps 1.79 against 1.94;
docs/BENCHMARKS.md). A program holds BLOCK_D channels of one group in one warp, their states as an (N, BLOCK_D)
float32 tile, and

1. walks forward through the sequence and stores the state at the start of every tile of N steps (the checkpoints);
2. walks the tiles backwards: from a tile's checkpoint it rebuilds WALK of the tile's states at a time in registers
   (starting over from the checkpoint for each group: more forward steps, no memory round trips), then goes through
   those steps in reverse with the adjoint state x_t = C_t dy_t + a_{t+1} x_{t+1} (a_t = exp(dt_t A)) and forms
   every gradient from x, h and the inputs. a_t h_{t-1} is taken as h_t - dt_t u_t B_t: no division by a decay.

dB and dC of a step are summed over the program's channels and stored as the program's partial sums, which torch adds
up afterwards (atomic adds per step, and states kept in scratch memory, each cost about half the time: those
variants' timings are in docs/BENCHMARKS.md). Everything is float32; semantics as
ops/scan/reference.py. It needs only the forward's inputs, no saved state.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from nnunetv2_sa_umamba.ops.scan.kernels import LOG2_E, SOFTPLUS_THRESHOLD, _delta
from nnunetv2_sa_umamba.ops.scan.sequential_forward import RUNTIME_SIZES, supports

WALK_STEPS = 4  # states rebuilt and held in registers at once: 8 was no faster on an H200
# 8 channels per program (one warp) was the fastest at all four of SS2D's stages at batch 28 on an H200, against 4 and
# 16 in one warp and 16 in two (docs/BENCHMARKS.md)
CHANNELS_PER_PROGRAM = 8


@triton.jit
def _tile_inputs(u_ptr, delta_ptr, row, t0, length, mask_d, bias, HAS_BIAS: tl.constexpr,
                 SOFTPLUS: tl.constexpr, N: tl.constexpr):
    """Offsets and mask of the (N steps, BLOCK_D) tile from step t0, u, delta before softplus, and dt."""
    offs_t = t0 + tl.arange(0, N)
    offs = tl.max_contiguous(row[None, :] + offs_t[:, None], [N, 1])
    mask = (offs_t < length)[:, None] & mask_d[None, :]
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    raw, dt = _delta(delta_ptr, offs, 0, mask, bias, HAS_BIAS, SOFTPLUS)
    return offs, mask, u, raw, dt


@triton.jit
def _row(tile, s, N: tl.constexpr):
    """tile[s, :] of an (N, BLOCK_D) tile, s known at compile or at run time (-0.0 elsewhere: x + -0.0 == x)."""
    return tl.sum(tl.where(tl.arange(0, N)[:, None] == s, tile, -0.0), axis=0)


@triton.jit
def _step_forward(h, t, length, Bt_ptr, bc, offs_n, A2, u_s, dt_s, N: tl.constexpr):
    """The state after step t from the state before it."""
    B = tl.load(Bt_ptr + bc + t * N + offs_n, mask=t < length, other=0.0).to(tl.float32)
    return tl.exp2(A2 * dt_s[None, :]) * h + B[:, None] * (dt_s * u_s)[None, :]


@triton.jit
def _step_backward(s, t, h, length, Bt_ptr, Ct_ptr, bc, dB_ptr, dC_ptr, bc_out, offs_n, A, A2, u_s, dt_s, dy_s, D,
                   carry, dA, du, ddt, N: tl.constexpr):
    """Step t = t0 + s in reverse, h the state after it: the adjoint state, the step's du and ddelta (into the
    tiles du, ddt at row s), dA, and the step's dB and dC summed over the program's channels (stored as this
    program's partial sums)."""
    step_ok = t < length
    B = tl.load(Bt_ptr + bc + t * N + offs_n, mask=step_ok, other=0.0).to(tl.float32)[:, None]
    C = tl.load(Ct_ptr + bc + t * N + offs_n, mask=step_ok, other=0.0).to(tl.float32)[:, None]
    dtu_s = (dt_s * u_s)[None, :]
    x = carry + C * dy_s[None, :]
    x_decayed_prev = x * (h - B * dtu_s)  # x_t a_t h_{t-1}
    x_B = tl.sum(x * B, axis=0)
    ddt_s = tl.sum(x_decayed_prev * A, axis=0) + u_s * x_B
    du_s = x_B * dt_s + D * dy_s
    steps = tl.arange(0, N)[:, None]
    du = tl.where(steps == s, du_s[None, :], du)
    ddt = tl.where(steps == s, ddt_s[None, :], ddt)
    dA += x_decayed_prev * dt_s[None, :]
    out = bc_out + t * N + offs_n
    tl.store(dB_ptr + out, tl.sum(x * dtu_s, axis=1), mask=step_ok)
    tl.store(dC_ptr + out, tl.sum(h * dy_s[None, :], axis=1), mask=step_ok)
    return tl.exp2(A2 * dt_s[None, :]) * x, dA, du, ddt


@triton.jit(do_not_specialize=RUNTIME_SIZES + ["n_tiles"])
def _backward_kernel(u_ptr, delta_ptr, A_ptr, Bt_ptr, Ct_ptr, D_ptr, bias_ptr, dy_ptr, checkpoint_ptr,
                     du_ptr, ddelta_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr,
                     channels, length, channels_per_group, groups, n_tiles,
                     HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                     N: tl.constexpr, BLOCK_D: tl.constexpr, WALK: tl.constexpr):
    blocks_per_group = tl.cdiv(channels_per_group, BLOCK_D)
    group = tl.program_id(0) // blocks_per_group
    block = tl.program_id(0) % blocks_per_group
    in_group = block * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = in_group < channels_per_group
    offs_d = group * channels_per_group + in_group
    offs_n = tl.arange(0, N)
    batch = tl.program_id(1)
    A = tl.load(A_ptr + offs_d[None, :] * N + offs_n[:, None], mask=mask_d[None, :], other=0.0)
    A2 = A * LOG2_E
    bias_d = 0.0
    if HAS_BIAS:
        bias_d = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0)
    D = 0.0
    if HAS_D:
        D = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0)
    rows = (batch * channels + offs_d).to(tl.int64) * length
    bc = (batch * groups + group).to(tl.int64) * length * N
    # this program's own (L, N) rows of dB and dC partial sums, added up over the group's programs afterwards
    bc_out = ((batch * groups + group) * blocks_per_group + block).to(tl.int64) * length * N
    # checkpoint k of a channel: its state before step k N, in a (batch, channels, n_tiles, N) buffer
    checkpoints = checkpoint_ptr + (batch * channels + offs_d)[None, :].to(tl.int64) * (n_tiles * N) + offs_n[:, None]
    keep_d = mask_d[None, :]

    h = tl.zeros([N, BLOCK_D], dtype=tl.float32)
    for tile in range(n_tiles):
        t0 = tile * N
        tl.store(checkpoints + tile * N, h, mask=keep_d)
        _, _, u, _, dt = _tile_inputs(u_ptr, delta_ptr, rows, t0, length, mask_d, bias_d[None, :], HAS_BIAS,
                                      SOFTPLUS, N)
        for s in range(N):
            h = _step_forward(h, t0 + s, length, Bt_ptr, bc, offs_n, A2, _row(u, s, N), _row(dt, s, N), N)

    carry = tl.zeros([N, BLOCK_D], dtype=tl.float32)  # a_{t+1} x_{t+1}, flowing into step t
    dA = tl.zeros([N, BLOCK_D], dtype=tl.float32)
    dD = tl.zeros([BLOCK_D], dtype=tl.float32)
    dbias = tl.zeros([BLOCK_D], dtype=tl.float32)
    for reversed_tile in range(n_tiles):
        t0 = (n_tiles - 1 - reversed_tile) * N
        offs, mask, u, _, dt = _tile_inputs(u_ptr, delta_ptr, rows, t0, length, mask_d, bias_d[None, :], HAS_BIAS,
                                            SOFTPLUS, N)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        h_start = tl.load(checkpoints + t0, mask=keep_d, other=0.0)
        du = tl.zeros([N, BLOCK_D], dtype=tl.float32)
        ddt = tl.zeros([N, BLOCK_D], dtype=tl.float32)
        # the tile's steps in reverse, WALK at a time: each walk's states rebuilt in registers from the tile's
        # checkpoint (forward steps recomputed instead of states kept in memory)
        for walk in range(N // WALK):
            s0 = (N // WALK - 1 - walk) * WALK
            h = h_start
            for s in range(s0):
                h = _step_forward(h, t0 + s, length, Bt_ptr, bc, offs_n, A2, _row(u, s, N), _row(dt, s, N), N)
            states = (h,)
            for k in tl.static_range(WALK):
                states = states + (_step_forward(states[k], t0 + s0 + k, length, Bt_ptr, bc, offs_n, A2,
                                                 _row(u, s0 + k, N), _row(dt, s0 + k, N), N),)
            for r in tl.static_range(WALK):
                s = s0 + WALK - 1 - r
                carry, dA, du, ddt = _step_backward(s, t0 + s, states[WALK - r], length, Bt_ptr, Ct_ptr, bc, dB_ptr,
                                                    dC_ptr, bc_out, offs_n, A, A2, _row(u, s, N), _row(dt, s, N),
                                                    _row(dy, s, N), D, carry, dA, du, ddt, N)
        if SOFTPLUS:
            # delta + bias read again rather than held through the tile
            raw = tl.load(delta_ptr + offs, mask=mask, other=0.0).to(tl.float32) + bias_d[None, :]
            ddt = tl.where(raw <= SOFTPLUS_THRESHOLD, ddt / (1.0 + tl.exp(-raw)), ddt)
        ddt = tl.where(mask, ddt, 0.0)
        tl.store(du_ptr + offs, du.to(du_ptr.dtype.element_ty), mask=mask)
        tl.store(ddelta_ptr + offs, ddt.to(ddelta_ptr.dtype.element_ty), mask=mask)
        dD += tl.sum(dy * u, axis=0)
        dbias += tl.sum(ddt, axis=0)
    # A, D and the bias are shared by the batch: its programs add up
    tl.atomic_add(dA_ptr + offs_d[None, :] * N + offs_n[:, None], dA, mask=keep_d)
    if HAS_D:
        tl.atomic_add(dD_ptr + offs_d, dD, mask=mask_d)
    if HAS_BIAS:
        tl.atomic_add(dbias_ptr + offs_d, dbias, mask=mask_d)


def launch_config(channels_per_group: int) -> tuple[int, int]:
    """Default (block_d, num_warps) for groups of ``channels_per_group`` channels."""
    return min(CHANNELS_PER_PROGRAM, triton.next_power_of_2(channels_per_group)), 1


def program_count(batch: int, channels: int, groups: int) -> int:
    """How many programs (walks through the sequence) the default launch runs."""
    block_d = launch_config(channels // groups)[0]
    return groups * triton.cdiv(channels // groups, block_d) * batch


def backward(dout: torch.Tensor, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
             C: torch.Tensor, D: torch.Tensor | None, delta_bias: torch.Tensor | None, delta_softplus: bool,
             block_d: int | None = None, num_warps: int | None = None, walk: int = WALK_STEPS):
    """(du, ddelta, dA, dB, dC, dD, ddelta_bias) as mamba-ssm's ``selective_scan_cuda.bwd`` returns them without z:
    du, ddelta in u's dtype, dB, dC in B's, dA, dD, ddelta_bias float32 (dD, ddelta_bias None when D, delta_bias
    are). Shapes and dtypes of the inputs as ``sequential_forward.forward`` takes them; dout like u.
    ``walk``: steps whose states are rebuilt and held in registers at once (a power of two; at most the state size).
    block_d, num_warps: ``launch_config``'s by default."""
    batch, channels, length = u.shape
    d_state, groups = A.shape[1], B.shape[1]
    if not supports(d_state):
        raise ValueError(f"the sequential backward scan needs a power-of-two state size in [2, 64], got {d_state}")
    if walk < 1 or walk & (walk - 1):
        raise ValueError(f"walk must be a power of two, got {walk}")
    default_block_d, default_warps = launch_config(channels // groups)
    block_d = block_d or default_block_d
    dout, u, delta, A = dout.contiguous(), u.contiguous(), delta.contiguous(), A.contiguous()
    Bt, Ct = (t.transpose(-1, -2).contiguous() for t in (B, C))
    n_tiles = triton.cdiv(length, d_state)
    blocks_per_group = triton.cdiv(channels // groups, block_d)
    grid = (groups * blocks_per_group, batch)
    checkpoints = torch.empty(batch, channels, n_tiles, d_state, device=u.device, dtype=torch.float32)
    du, ddelta = torch.empty_like(u), torch.empty_like(delta)
    dA = torch.zeros(channels, d_state, device=u.device, dtype=torch.float32)
    # every program writes its own partial sums of every step; torch adds them up below
    partial_dBCt = torch.empty(2, batch, groups, blocks_per_group, length, d_state, device=u.device,
                               dtype=torch.float32)
    dD = torch.zeros(channels, device=u.device, dtype=torch.float32)
    dbias = torch.zeros_like(dD)
    _backward_kernel[grid](u, delta, A, Bt, Ct, A if D is None else D, A if delta_bias is None else delta_bias, dout,
                           checkpoints, du, ddelta, dA, partial_dBCt[0], partial_dBCt[1], dD, dbias,
                           channels, length, channels // groups, groups, n_tiles,
                           HAS_D=D is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
                           N=d_state, BLOCK_D=block_d, WALK=min(walk, d_state),
                           num_warps=num_warps or default_warps)
    dBCt = partial_dBCt.sum(3)
    # (batch, groups, N, L) in B's dtype: transposed and cast in one copy
    contiguous = torch.contiguous_format
    dB, dC = torch.empty_like(B, memory_format=contiguous), torch.empty_like(C, memory_format=contiguous)
    dB.copy_(dBCt[0].transpose(-1, -2))
    dC.copy_(dBCt[1].transpose(-1, -2))
    return (du, ddelta, dA, dB, dC,
            None if D is None else dD, None if delta_bias is None else dbias)
