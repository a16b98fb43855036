"""The selective scan, one step at a time under autograd (``reference`` backend): the ground truth for tests.

mamba-ssm's ``selective_scan_fn`` semantics (no ``z``, no last state), which every backend follows:

    delta = softplus(delta + delta_bias)          (bias and softplus optional)
    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t,   h_0 = 0
    y_t = <h_t, C_t> + D * u_t

Shapes: u, delta (batch, dim, L); A (dim, N); B, C (batch, groups, N, L), channel d reads group
d // (dim // groups); D, delta_bias (dim,). The state is kept in float32, or float64 for float64 inputs.
"""
import torch
import torch.nn.functional as F
from torch import Tensor


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype the recurrence runs in for inputs of ``dtype``: float32, or float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def prepare_inputs(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, delta_bias: Tensor | None,
                   delta_softplus: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Cast to the state dtype and apply delta's bias and softplus (differentiable)."""
    f = state_dtype(u.dtype)
    delta = delta.to(f)
    if delta_bias is not None:
        delta = delta + delta_bias.to(f)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)  # threshold 20, like the CUDA kernel
    return u.to(f), delta, A.to(f), B.to(f), C.to(f)


def finish_output(y: Tensor, u: Tensor, D: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    """y + D * u, in ``out_dtype``."""
    if D is not None:
        y = y + D.to(y.dtype)[:, None] * u
    return y.to(out_dtype)


def selective_scan_reference(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                             D: Tensor | None = None, delta_bias: Tensor | None = None,
                             delta_softplus: bool = False) -> Tensor:
    """The recurrence, one step at a time under autograd: the ground truth for tests.

    Returns y (batch, dim, L) in u's dtype. Slow (O(L) small ops forward and backward).
    """
    out_dtype = u.dtype
    u, delta, A, B, C = prepare_inputs(u, delta, A, B, C, delta_bias, delta_softplus)
    per_group = u.shape[1] // B.shape[1]
    B = B.repeat_interleave(per_group, dim=1)  # (batch, dim, N, L)
    C = C.repeat_interleave(per_group, dim=1)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for delta_t, u_t, B_t, C_t in zip(delta.unbind(-1), u.unbind(-1), B.unbind(-1), C.unbind(-1), strict=True):
        h = torch.exp(delta_t[..., None] * A) * h + (delta_t * u_t)[..., None] * B_t
        ys.append((h * C_t).sum(-1))
    return finish_output(torch.stack(ys, dim=-1), u, D, out_dtype)
