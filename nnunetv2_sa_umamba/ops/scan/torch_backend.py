"""The chunked pure-PyTorch selective scan (``torch`` backend), with the semantics of ops/scan/reference.py.

It is a ``torch.library.custom_op`` with a hand-written backward. Its forward walks the sequence in chunks
of ``chunk_len`` steps and keeps only the state at each chunk start; its backward recomputes one chunk at a
time (as mamba-ssm's kernel does), so memory stays at the inputs plus one (batch, dim, N) state per chunk,
where autograd through a step loop keeps several per step. Inside a chunk all decays, inputs and gradient
terms are computed as whole-chunk tensor ops and only the state update itself runs step by step (one fused
multiply-add each): on CPU, memory traffic and not the op count dominates at SS2D sizes, so in-chunk log-depth
(Hillis-Steele) scans and quadratic (T x T segment-sum) forms, which do more arithmetic, are slower. Every
factor exp(delta * A) lies in (0, 1] for A <= 0, so nothing can overflow however large delta or L get, and no
exp(+cumsum) or cumsum difference loses precision.
"""
import torch
from torch import Tensor

from nnunetv2_sa_umamba.ops.scan.reference import finish_output, prepare_inputs

# Default chunk length: long chunks save per-chunk op overhead on small tensors, short ones keep the chunk's
# (T, batch, dim, N) buffers near cache size on large ones (SS2D's large stages: 16; small tensors: 64). It
# changes speed and memory only, never results.
MIN_CHUNK_LEN, MAX_CHUNK_LEN = 16, 64
CHUNK_ELEMENTS = 1 << 20


def default_chunk_len(batch: int, dim: int, d_state: int) -> int:
    """Steps per chunk for the torch backend: about CHUNK_ELEMENTS state values, within 16..64."""
    return max(MIN_CHUNK_LEN, min(MAX_CHUNK_LEN, CHUNK_ELEMENTS // (batch * dim * d_state)))


def _time_major(x: Tensor, groups: int) -> Tensor:
    """(batch, dim, L) -> contiguous (L, batch, groups, dim // groups, 1)."""
    b, d, length = x.shape
    return x.permute(2, 0, 1).reshape(length, b, groups, d // groups, 1).contiguous()


def _from_time_major(x: Tensor) -> Tensor:
    """(L, batch, groups, dim // groups) -> contiguous (batch, dim, L)."""
    length, b, g, k = x.shape
    return x.permute(1, 2, 3, 0).reshape(b, g * k, length).contiguous()


class _Layout:
    """Time-major copies of the scan inputs, shared by the forward and the backward.

    dt, dtu, ut: (L, batch, groups, k, 1) for delta, delta * u and u (k = dim // groups);
    Bt, Ct: (L, batch, groups, 1, N); A: (groups, k, N).
    """

    def __init__(self, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor):
        self.groups = B.shape[1]
        self.dt = _time_major(delta, self.groups)
        self.ut = _time_major(u, self.groups)
        self.dtu = self.dt * self.ut
        self.Bt = B.permute(3, 0, 1, 2).unsqueeze(3).contiguous()
        self.Ct = C.permute(3, 0, 1, 2).unsqueeze(3).contiguous()
        self.A = A.reshape(self.groups, -1, A.shape[1])

    def chunk_states(self, s: int, e: int, h0: Tensor) -> tuple[Tensor, Tensor]:
        """Decays a (T, batch, groups, k, N) of steps s..e-1 and states h (T+1, ...), h[0] = h0."""
        a = torch.mul(self.dt[s:e], self.A).exp_()
        h = a.new_empty((e - s + 1,) + h0.shape)
        h[0] = h0
        torch.mul(self.dtu[s:e], self.Bt[s:e], out=h[1:])
        a_t, h_t = a.unbind(0), h.unbind(0)  # one call for all views: cheaper than indexing per step
        for t in range(e - s):
            h_t[t + 1].addcmul_(a_t[t], h_t[t])
        return a, h


@torch.library.custom_op("saumamba::scan_torch_fwd", mutates_args=())
def _scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
              chunk_len: int) -> tuple[Tensor, Tensor]:
    """y = sum_n h * C (batch, dim, L) and the chunk-start states (n_chunks, batch, groups, k, N)."""
    b, d, length = u.shape
    lay = _Layout(u, delta, A, B, C)
    starts = range(0, length, chunk_len)
    states = u.new_zeros((len(starts), b, lay.groups, d // lay.groups, A.shape[1]))
    y = u.new_empty((length, b, lay.groups, d // lay.groups))
    for i, s in enumerate(starts):
        e = min(s + chunk_len, length)
        _, h = lay.chunk_states(s, e, states[i])
        torch.sum(h[1:] * lay.Ct[s:e], dim=-1, out=y[s:e])
        if i + 1 < len(starts):
            states[i + 1] = h[-1]
    return _from_time_major(y), states


@_scan_fwd.register_fake
def _(u, delta, A, B, C, chunk_len):
    b, d, length = u.shape
    g = B.shape[1]
    n_chunks = (length + chunk_len - 1) // chunk_len
    return u.new_empty((b, d, length)), u.new_empty((n_chunks, b, g, d // g, A.shape[1]))


@torch.library.custom_op("saumamba::scan_torch_bwd", mutates_args=())
def _scan_bwd(dy: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, states: Tensor,
              chunk_len: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (du, ddelta, dA, dB, dC) of ``_scan_fwd``'s y, shaped like the inputs.

    With G_t = dL/dh_t = C_t dy_t + exp(delta_{t+1} A) G_{t+1} (a reverse scan) and
    Q_t = G_t exp(delta_t A) h_{t-1} (the gradient of delta_t * A):
    du = delta sum_n G B, ddelta = u sum_n G B + sum_n Q A, dA = sum_{batch,t} Q delta,
    dB = sum_k G delta u, dC = sum_k dy h (sums over k = channels of a group).
    """
    b, d, length = u.shape
    lay = _Layout(u, delta, A, B, C)
    g, n = lay.groups, A.shape[1]
    dyt = _time_major(dy.to(u.dtype), g)
    du = u.new_empty((length, b, g, d // g))
    ddelta = torch.empty_like(du)
    dB = u.new_empty((length, b, g, n))
    dC = torch.empty_like(dB)
    dA = torch.zeros_like(lay.A)
    carry = torch.zeros_like(states[0])  # exp(delta_e A) G_e from the chunk after this one
    starts = range(0, length, chunk_len)
    for i in reversed(range(len(starts))):
        s = starts[i]
        e = min(s + chunk_len, length)
        a, h = lay.chunk_states(s, e, states[i])
        G = dyt[s:e] * lay.Ct[s:e]
        G[-1] += carry
        a_t, G_t = a.unbind(0), G.unbind(0)
        for t in range(e - s - 2, -1, -1):
            G_t[t].addcmul_(a_t[t + 1], G_t[t + 1])
        carry = a[0] * G[0]
        torch.sum(dyt[s:e] * h[1:], dim=3, out=dC[s:e])
        torch.sum(G * lay.dtu[s:e], dim=3, out=dB[s:e])
        GB = torch.sum(G * lay.Bt[s:e], dim=-1)
        torch.mul(lay.dt[s:e, ..., 0], GB, out=du[s:e])
        Q = a.mul_(h[:-1]).mul_(G)
        torch.sum(Q * lay.A, dim=-1, out=ddelta[s:e])
        ddelta[s:e].addcmul_(lay.ut[s:e, ..., 0], GB)
        dA += torch.sum(Q * lay.dt[s:e], dim=(0, 1))
    return (_from_time_major(du), _from_time_major(ddelta), dA.reshape(d, n),
            dB.permute(1, 2, 3, 0).contiguous(), dC.permute(1, 2, 3, 0).contiguous())


@_scan_bwd.register_fake
def _(dy, u, delta, A, B, C, states, chunk_len):
    return (u.new_empty(u.shape), u.new_empty(u.shape), A.new_empty(A.shape), B.new_empty(B.shape),
            C.new_empty(C.shape))


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, chunk_len = inputs
    ctx.save_for_backward(u, delta, A, B, C, output[1])
    ctx.chunk_len = chunk_len


def _backward(ctx, dy, _dstates):
    grads = torch.ops.saumamba.scan_torch_bwd(dy, *ctx.saved_tensors, ctx.chunk_len)
    return (*grads, None)


_scan_fwd.register_autograd(_backward, setup_context=_setup_context)


def selective_scan_torch(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                         D: Tensor | None = None, delta_bias: Tensor | None = None,
                         delta_softplus: bool = False, chunk_len: int | None = None) -> Tensor:
    """Chunked pure-PyTorch selective scan; y (batch, dim, L) in u's dtype, any device.

    ``chunk_len``: steps per chunk, None for ``default_chunk_len``.
    """
    if chunk_len is None:
        chunk_len = default_chunk_len(u.shape[0], u.shape[1], A.shape[1])
    elif chunk_len < 1:
        raise ValueError(f"chunk_len must be >= 1, got {chunk_len}")
    out_dtype = u.dtype
    u, delta, A, B, C = prepare_inputs(u, delta, A, B, C, delta_bias, delta_softplus)
    y = torch.ops.saumamba.scan_torch_fwd(u, delta, A, B, C, chunk_len)[0]
    return finish_output(y, u, D, out_dtype)
