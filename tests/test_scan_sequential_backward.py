"""The sequential Triton scan backward (ops/scan/sequential_backward.py): every gradient against the float64
reference's autograd, and the ``scan_backward`` choice. Without a GPU the kernel runs in Triton's interpreter
(tests/conftest.py turns it on); beside mamba-ssm's kernels in the cuda backend's op: tests/test_selective_scan.py."""
import pytest
import torch

from nnunetv2_sa_umamba.ops.scan import cuda_backend, interface
from nnunetv2_sa_umamba.ops.scan import sequential_backward as kernel
from nnunetv2_sa_umamba.ops.scan.reference import selective_scan_reference

from test_scan_sequential_forward import case_inputs
from test_selective_scan import make_inputs, rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("u", "delta", "A", "B", "C", "D", "delta_bias")


def reference_gradients(inputs, dout, softplus):
    """The float64 reference's gradients of <y, dout> with respect to every input that is not None."""
    leaves = {k: (v.double().requires_grad_() if v is not None else None) for k, v in inputs.items()}
    y = selective_scan_reference(*(leaves[k] for k in NAMES), delta_softplus=softplus)
    present = [k for k in NAMES if leaves[k] is not None]
    return dict(zip(present, torch.autograd.grad(y, [leaves[k] for k in present], dout.double()), strict=True))


CASES = [  # batch, dim, L, N, groups, use D, use delta_bias, softplus, block_d
    # 3 groups of 6 channels in programs of 4 (the second half masked); L not a multiple of the tile (N steps)
    pytest.param(1, 18, 19, 4, 3, True, True, True, 4, id="groups3-masked-channels-L19"),
    pytest.param(2, 8, 5, 4, 2, True, True, True, None, id="L5-shorter-than-a-tile"),
    pytest.param(1, 16, 48, 16, 4, False, False, False, None, id="N16-three-tiles-noD-nobias"),
    pytest.param(2, 8, 1, 4, 2, True, True, True, None, id="L1"),
    pytest.param(2, 8, 23, 2, 1, True, False, True, 8, id="groups1-N2-L23-nobias"),
    # SS2D's deepest stage in small: 4 groups of 8 channels, 16 states, 64 steps, the default program size
    pytest.param(1, 32, 64, 16, 4, True, True, True, None, id="ss2d-like-N16-L64"),
]


# every case with the default walk of 4 states; longer walks (fewer rebuilds per tile) on the multi-tile cases
WALKS = [pytest.param(*case.values, kernel.WALK_STEPS, id=f"{case.id}-walk{kernel.WALK_STEPS}") for case in CASES] + [
    pytest.param(*case.values, walk, id=f"{case.id}-walk{walk}")
    for case in CASES if case.id in ("groups3-masked-channels-L19", "N16-three-tiles-noD-nobias") for walk in (8, 16)]


@pytest.mark.parametrize("batch,dim,length,d_state,groups,use_D,use_bias,softplus,block_d,walk", WALKS)
def test_backward_matches_reference(batch, dim, length, d_state, groups, use_D, use_bias, softplus, block_d,
                                    walk):
    inputs = case_inputs(batch, dim, length, d_state, groups, use_D, use_bias, softplus)
    dout = torch.randn(batch, dim, length, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    grads = kernel.backward(dout, *(inputs[k] for k in NAMES), softplus, block_d=block_d, walk=walk)
    expected = reference_gradients(inputs, dout, softplus)
    for name, grad in zip(NAMES, grads, strict=True):
        if inputs[name] is None:
            assert grad is None, name
            continue
        assert grad.shape == inputs[name].shape and grad.dtype == inputs[name].dtype, name
        assert grad.is_contiguous(), name
        if expected[name].abs().max() == 0:  # dA of a single step: a_t h_{t-1} = h_t - b_t rounds to about 1e-8
            assert grad.abs().max() < 1e-6, name
        else:
            assert rel_err(grad, expected[name]) < 1e-5, name


def test_sixteen_bit_inputs_give_sixteen_bit_gradients():
    inputs = make_inputs(2, 8, 20, 4, 2, dtype=torch.float32, device=DEVICE)
    low = {k: v.to(torch.bfloat16) if k in ("u", "delta", "B", "C") else v for k, v in inputs.items()}
    dout = torch.randn(2, 8, 20).to(DEVICE, torch.bfloat16)
    du, ddelta, dA, dB, dC, dD, dbias = kernel.backward(dout, *(low[k] for k in NAMES), True)
    assert (du.dtype, ddelta.dtype, dB.dtype, dC.dtype) == (torch.bfloat16,) * 4
    assert (dA.dtype, dD.dtype, dbias.dtype) == (torch.float32,) * 3
    expected = reference_gradients({k: v.float() if v.dtype == torch.bfloat16 else v for k, v in low.items()},
                                   dout.float(), True)
    assert rel_err(du, expected["u"]) < 1e-2 and rel_err(dB, expected["B"]) < 1e-2


def test_the_ops_fake_outputs_are_the_kernels(monkeypatch):
    """The cuda backend's op around the kernel: its fake implementation (what torch.compile and fake-tensor tracing
    see) gives the shapes, dtypes and strides the kernel returns, here for B and C given as strided views."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    inputs = make_inputs(2, 8, 20, 4, 2, dtype=torch.float32, device=DEVICE)
    inputs.update({k: inputs[k].to(torch.bfloat16) for k in ("u", "delta")})
    inputs.update({k: inputs[k].transpose(-1, -2).contiguous().transpose(-1, -2).to(torch.bfloat16)
                   for k in ("B", "C")})
    dout = torch.randn(2, 8, 20, dtype=torch.bfloat16, device=DEVICE)
    for D, bias in ((inputs["D"], inputs["delta_bias"]), (None, None)):
        args = (dout, *(inputs[k] for k in NAMES[:5]), D, bias, True)
        grads = kernel.backward(*args)
        real = [cuda_backend.optional_output(g, inputs["A"]) for g in grads]
        with FakeTensorMode() as mode:
            fake = torch.ops.saumamba.scan_sequential_bwd(*(mode.from_tensor(a) if torch.is_tensor(a) else a
                                                            for a in args))
        assert [(f.shape, f.dtype, f.stride()) for f in fake] == [(r.shape, r.dtype, r.stride()) for r in real]


def test_state_size_and_walk_must_be_powers_of_two():
    inputs = make_inputs(1, 4, 8, 3, 1, dtype=torch.float32)
    with pytest.raises(ValueError, match="power-of-two state size"):
        kernel.backward(torch.zeros(1, 4, 8), *(inputs[k] for k in NAMES), True)
    inputs = make_inputs(1, 4, 8, 4, 1, dtype=torch.float32)
    with pytest.raises(ValueError, match="walk must be a power of two"):
        kernel.backward(torch.zeros(1, 4, 8), *(inputs[k] for k in NAMES), True, walk=3)


def test_the_choice_of_backward(monkeypatch):
    u = torch.zeros(1, 256, interface.SEQUENTIAL_BACKWARD_MAX_LENGTH, device=DEVICE)
    assert not interface.use_sequential_backward(u, 16, 4, "torch")
    # "triton" runs it wherever it can (on a CPU tensor through the interpreter the tests run in), at any length
    assert interface.use_sequential_backward(u[..., :3], 16, 4, "triton") is True
    with pytest.raises(ValueError, match="power-of-two state size in \\[2, 64\\], got 12; choose scan_backward"):
        interface.use_sequential_backward(u, 12, 4, "triton")
    # "auto": where the Triton kernels run at all (CUDA tensors), for scans of 64-128 steps with programs of 8
    # channels enough to give a GPU of 2 SMs 16 of them
    monkeypatch.setattr(interface, "fused_kernels_run", lambda choice, *args: choice != "torch")
    monkeypatch.setattr(interface, "_multiprocessors", lambda device: 2)
    assert interface.use_sequential_backward(u, 16, 4, "auto")  # 4 groups of 64 channels: 32 programs
    assert interface.use_sequential_backward(u[..., :interface.SEQUENTIAL_FORWARD_MIN_LENGTH], 16, 4, "auto")
    assert not interface.use_sequential_backward(u[:, :120], 16, 1, "auto")  # 15 programs
    assert interface.use_sequential_backward(u[:, :120].expand(2, -1, -1), 16, 1, "auto")  # 30: the batch counts
    assert not interface.use_sequential_backward(u, 12, 4, "auto")  # a state size it cannot take
    longer = torch.zeros(1, 256, interface.SEQUENTIAL_BACKWARD_MAX_LENGTH + 1, device=DEVICE)
    assert not interface.use_sequential_backward(longer, 16, 4, "auto")  # mamba-ssm's backward is faster
    assert not interface.use_sequential_backward(u[..., :interface.SEQUENTIAL_FORWARD_MIN_LENGTH - 1], 16, 4,
                                                 "auto")  # too short to be worth its compile
