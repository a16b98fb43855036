"""The sequential Triton scan forward (ops/scan/sequential_forward.py): y against the sequential reference, and the
saved states x as mamba-ssm's forward writes them; the ``scan_forward`` choice; on a GPU, the forward beside
mamba-ssm's backward against mamba-ssm's forward and backward.

Without a GPU the kernel runs in Triton's interpreter (tests/conftest.py turns it on), with chunks of a few steps so
that short sequences cross several. CUDA tests (marked ``cuda``) print their largest errors; run them with
``pytest -m cuda -s``.
"""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from nnunetv2_sa_umamba.modules.ss2d import SS2D
from nnunetv2_sa_umamba.ops.policy import KernelPolicy
from nnunetv2_sa_umamba.ops.scan import cuda_backend, interface
from nnunetv2_sa_umamba.ops.scan import sequential_forward as kernel
from nnunetv2_sa_umamba.ops.scan.reference import selective_scan_reference

from test_selective_scan import make_inputs, rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("u", "delta", "A", "B", "C", "D", "delta_bias")


def reference_states(u, delta, A, B, C, delta_bias, softplus, chunk):
    """x as mamba-ssm's forward writes it, step by step in float64: per chunk of ``chunk`` steps, the pair (product of
    exp(dt A) since the start, h) per state at the chunk's last step."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if softplus:
        delta = F.softplus(delta)
    per_group = u.shape[1] // B.shape[1]
    B, C = B.repeat_interleave(per_group, dim=1), C.repeat_interleave(per_group, dim=1)
    h = u.new_zeros(*u.shape[:2], A.shape[1])
    decay = torch.ones_like(h)
    length = u.shape[-1]
    pairs = []
    for t in range(length):
        a = torch.exp(delta[..., t, None] * A)
        h = a * h + (delta[..., t] * u[..., t])[..., None] * B[..., t]
        decay = decay * a
        if (t + 1) % chunk == 0 or t == length - 1:
            pairs.append(torch.stack([decay, h], dim=-1).flatten(-2))  # (batch, dim, 2 N): a0, h0, a1, h1, ...
    return torch.stack(pairs, dim=2)


CASES = [  # batch, dim, L, N, groups, use D, use delta_bias, softplus, block_d, state_chunk
    # 3 groups of 6 channels in programs of 4 (the second half masked); 3 chunks of 8, the last partial
    pytest.param(1, 18, 19, 4, 3, True, True, True, 4, 8, id="groups3-masked-channels-L19-chunk8"),
    pytest.param(2, 8, 5, 4, 2, True, True, True, None, 8, id="L5-shorter-than-a-tile"),
    pytest.param(1, 16, 32, 16, 4, False, False, False, None, 16, id="N16-L32-two-exact-chunks-noD-nobias"),
    pytest.param(2, 8, 1, 4, 2, True, True, True, None, 2048, id="L1"),
    pytest.param(1, 8, 23, 2, 1, True, False, True, 8, 2, id="groups1-N2-L23-chunk2-nobias"),
]


def case_inputs(batch, dim, length, d_state, groups, use_D, use_bias, softplus):
    """float32 scan inputs on DEVICE, without D or delta_bias where a case says so."""
    inputs = make_inputs(batch, dim, length, d_state, groups, dtype=torch.float32, device=DEVICE)
    inputs["D"] = inputs["D"] if use_D else None
    inputs["delta_bias"] = inputs["delta_bias"] if use_bias else None
    if not softplus:  # positive steps, or the state grows without bound
        inputs["delta"] = inputs["delta"].abs() * 0.5
    return inputs


@pytest.mark.parametrize("batch,dim,length,d_state,groups,use_D,use_bias,softplus,block_d,state_chunk", CASES)
def test_forward_matches_reference(batch, dim, length, d_state, groups, use_D, use_bias, softplus, block_d,
                                   state_chunk):
    inputs = case_inputs(batch, dim, length, d_state, groups, use_D, use_bias, softplus)
    y, x = kernel.forward(*(inputs[k] for k in NAMES), softplus, state_chunk=state_chunk, block_d=block_d)
    y_ref = selective_scan_reference(*(inputs[k].double() if inputs[k] is not None else None for k in NAMES),
                                     delta_softplus=softplus)
    assert y.dtype == torch.float32 and y.shape == (batch, dim, length)
    assert rel_err(y, y_ref) < 1e-5
    x_ref = reference_states(inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"],
                             inputs["delta_bias"], softplus, state_chunk)
    assert x.shape == x_ref.shape == (batch, dim, -(-length // state_chunk), 2 * d_state)
    assert rel_err(x[..., 1::2], x_ref[..., 1::2]) < 1e-5  # the states
    assert (x[..., 0::2] - x_ref[..., 0::2]).abs().max() < 1e-5  # the decay products, in [0, 1]


def test_forward_writes_nothing_outside_its_outputs(monkeypatch):
    """Channels past a group's end (3 groups of 6 channels in programs of 4) and steps past the sequence's end are
    masked: y and x are handed out as slices of larger buffers whose margins must stay as they were."""
    margin, buffers = 64, []

    def padded(shape, dtype, device):
        buffer = torch.full((math.prod(shape) + 2 * margin,), 12345.0, dtype=dtype, device=device)
        buffers.append(buffer)
        return buffer[margin:-margin].view(shape)

    monkeypatch.setattr(kernel, "torch", SimpleNamespace(
        float32=torch.float32, empty=lambda shape, device, dtype: padded(shape, dtype, device),
        empty_like=lambda t: padded(t.shape, t.dtype, t.device)))
    inputs = make_inputs(1, 18, 19, 4, 3, dtype=torch.float32, device=DEVICE)
    y, x = kernel.forward(*(inputs[k] for k in NAMES), True, state_chunk=8, block_d=4)
    assert len(buffers) == 2 and x.shape == (1, 18, 3, 8)
    for buffer in buffers:
        assert (buffer[:margin] == 12345.0).all() and (buffer[-margin:] == 12345.0).all()
    y_ref = selective_scan_reference(*(inputs[k].double() for k in NAMES), delta_softplus=True)
    assert rel_err(y, y_ref) < 1e-5


def test_forward_keeps_the_input_dtype_and_rounds_once():
    inputs = make_inputs(2, 8, 20, 4, 2, dtype=torch.float32, device=DEVICE)
    half = {k: v.to(torch.bfloat16) if k in ("u", "delta", "B", "C") else v for k, v in inputs.items()}
    y, x = kernel.forward(*(half[k] for k in NAMES), True)
    y_ref = selective_scan_reference(*(half[k].double() for k in NAMES), delta_softplus=True)
    assert y.dtype == torch.bfloat16 and x.dtype == torch.float32
    assert rel_err(y, y_ref) < 8e-3  # bf16 rounding of the output only


@pytest.mark.parametrize("d_state, state_chunk, message", [
    (3, 2048, "power-of-two state size in \\[2, 64\\], got 3"),
    (128, 2048, "power-of-two state size in \\[2, 64\\], got 128"),
    (4, 6, "state_chunk must be a multiple of the state size 4, got 6"),
])
def test_forward_refuses_what_it_cannot_run(d_state, state_chunk, message):
    inputs = make_inputs(1, 4, 8, d_state, 1, dtype=torch.float32, device=DEVICE)
    with pytest.raises(ValueError, match=message):
        kernel.forward(*(inputs[k] for k in NAMES), True, state_chunk=state_chunk)


def test_the_choice_of_forward(monkeypatch):
    u = torch.zeros(1, 256, interface.SEQUENTIAL_FORWARD_MIN_LENGTH, device=DEVICE)
    assert not interface.use_sequential_forward(u, 16, 4, "torch")
    # "triton" runs it wherever it can (on a CPU tensor through the interpreter the tests run in)
    assert interface.use_sequential_forward(u, 16, 4, "triton") is True
    with pytest.raises(ValueError, match="power-of-two state size in \\[2, 64\\], got 12; choose scan_forward"):
        interface.use_sequential_forward(u, 12, 4, "triton")
    # "auto": where the Triton kernels run at all (CUDA tensors), with programs of 16 channels enough to give a GPU
    # of 2 SMs 16 of them
    monkeypatch.setattr(interface, "fused_kernels_run", lambda choice, *args: choice != "torch")
    monkeypatch.setattr(interface, "_multiprocessors", lambda device: 2)
    assert interface.use_sequential_forward(u, 16, 4, "auto")  # 4 groups of 64 channels: 16 programs
    assert not interface.use_sequential_forward(u[:, :240], 16, 1, "auto")  # 15 programs
    assert interface.use_sequential_forward(u[:, :240].expand(2, -1, -1), 16, 1, "auto")  # 30: the batch counts
    assert not interface.use_sequential_forward(u, 12, 4, "auto")  # a state size it cannot take
    assert not interface.use_sequential_forward(u[..., 1:], 16, 4, "auto")  # too short to be worth its compile


@pytest.mark.parametrize("field", ["scan_forward", "scan_backward"])
def test_ss2d_asks_for_the_kernels_its_policy_names(monkeypatch, field):
    """SS2D's fast path hands its policy's scan_forward (scan_backward) to the choice, and the choice to the cuda
    backend's op; the other field's choice stays out of it."""
    direction = field.removeprefix("scan_")
    asked, given = [], []
    monkeypatch.setattr(interface, "_choose_backend", lambda device, backend: "cuda")

    def choose(u, d_state, groups, choice):
        asked.append((d_state, groups, choice))
        return choice == "triton"

    for name in ("forward", "backward"):
        monkeypatch.setattr(interface, f"use_sequential_{name}", choose if name == direction else lambda *a: False)

    def op(u, *args, sequential_forward, sequential_backward):
        given.append({"forward": sequential_forward, "backward": sequential_backward}[direction])
        return torch.zeros_like(u)

    monkeypatch.setattr(cuda_backend, "selective_scan_cuda_lowrank_delta", op)
    for choice in ("triton", "torch"):
        module = SS2D(8, kernels=KernelPolicy(scan="cuda", **{field: choice}))
        module(torch.randn(1, 4, 4, 8))
    assert asked == [(16, 4, "triton"), (16, 4, "torch")] and given == [True, False]


needs_kernel = pytest.mark.skipif(not cuda_backend.kernel_available(),
                                  reason=f"selective_scan_cuda not importable: {cuda_backend.kernel_import_error()}")


@pytest.mark.cuda
@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,dim,length", [(2, 64, 64), (2, 96, 300), (1, 64, 4100)],
                         ids=["L64", "L300", "L4100-three-mamba-chunks"])
def test_beside_mamba_backward_matches_mamba(batch, dim, length, dtype):
    """The low-rank scan op with the sequential forward against the same op with mamba-ssm's forward: y and every
    gradient, the backward reading the states x the sequential forward saved (3 chunks at L = 4100)."""
    groups, d_state, rank = 4, 16, 6
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to("cuda")

    inputs = dict(u=randn(batch, dim, length).to(dtype), delta_low=randn(batch, groups, rank, length).to(dtype),
                  delta_weight=randn(groups, dim // groups, rank, scale=0.3).to(dtype),
                  A=-torch.arange(1, d_state + 1, dtype=torch.float32, device="cuda").repeat(dim, 1),
                  B=randn(batch, groups, d_state, length).to(dtype), C=randn(batch, groups, d_state, length).to(dtype),
                  D=randn(dim), delta_bias=randn(dim, scale=0.5) - 4.0)
    weight = randn(batch, dim, length)
    results = []
    for sequential in (True, False):
        leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
        y = cuda_backend.selective_scan_cuda_lowrank_delta(**leaves, delta_softplus=True,
                                                           sequential_forward=sequential)
        (y.float() * weight).sum().backward()
        results.append((y.detach(), {k: v.grad for k, v in leaves.items()}))
    (y, grads), (y_ref, grads_ref) = results
    errors = {"y": rel_err(y, y_ref), **{f"d{k}": rel_err(grads[k], grads_ref[k]) for k in grads}}
    print(f"\n{dtype} L{length}: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    # float32: two summation orders of one float32 scan; bfloat16: y (and what the backward takes from it, nothing
    # else) differs by a rounding of the output
    tolerance = 1e-5 if dtype == torch.float32 else 8e-3
    assert max(errors.values()) < tolerance


@pytest.mark.cuda
@needs_kernel
def test_states_match_mamba_forward():
    inputs = make_inputs(2, 32, 4100, 16, 4, dtype=torch.float32, device="cuda", delta_shift=-3.0)
    args = [inputs[k] for k in NAMES]
    y, x = kernel.forward(*args, True)
    y_ref, x_ref = torch.ops.saumamba.scan_cuda_fwd(*args, True)
    print(f"\ny {rel_err(y, y_ref):.1e}, states {rel_err(x[..., 1::2], x_ref[..., 1::2]):.1e}, decay products "
          f"{(x[..., 0::2] - x_ref[..., 0::2]).abs().max().item():.1e}")
    assert x.shape == x_ref.shape
    assert rel_err(y, y_ref) < 1e-5
    assert rel_err(x[..., 1::2], x_ref[..., 1::2]) < 1e-5
    assert (x[..., 0::2] - x_ref[..., 0::2]).abs().max() < 1e-5
