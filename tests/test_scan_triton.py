"""The ``triton`` selective-scan backend (ops/scan/triton_backend.py, kernels.py) against the sequential reference.

On machines without a GPU the kernels run in Triton's interpreter (tests/conftest.py turns it on), with small
chunks so that short sequences still cross several chunk boundaries. CUDA tests (marked ``cuda``) print their
largest errors; run them with ``pytest -m cuda -s``.
"""
import pytest
import torch

from nnunetv2_sa_umamba.ops.policy import SCAN_ENV_CHOICES, SCAN_ENV_VAR, kernel_policy
from nnunetv2_sa_umamba.ops.scan import interface as dispatch
from nnunetv2_sa_umamba.ops.scan import kernels as scan_kernels
from nnunetv2_sa_umamba.ops.scan import resolve_backend, selective_scan
from nnunetv2_sa_umamba.ops.scan.cuda_backend import kernel_available

from test_selective_scan import make_inputs, rel_err, report, run, with_dtype

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def close_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """rel_err, but absolute below magnitude 1: dA is exactly 0 for L = 1 (no earlier state), and float32
    rounding leaves ~1e-8 there."""
    return ((x.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1.0)).item()

CASES = [  # batch, dim, L, N, groups, use D, use delta_bias, softplus
    pytest.param(2, 8, 1, 4, 2, True, True, True, id="L1"),
    pytest.param(2, 8, 37, 4, 1, True, True, True, id="L37-groups1"),
    pytest.param(1, 16, 24, 16, 4, False, False, False, id="L24-exact-chunks-groups4-noD-nobias-nosoftplus"),
    pytest.param(1, 12, 19, 2, 2, True, False, True, id="L19-six-channels-per-group-nobias"),
]


@pytest.fixture
def short_chunks(monkeypatch):
    """Chunks of 8 steps: every case crosses chunk boundaries, as the network's sequences do."""
    monkeypatch.setattr(scan_kernels, "MAX_BLOCK_L", 8)


@pytest.mark.parametrize("batch,dim,length,d_state,groups,use_D,use_bias,softplus", CASES)
def test_triton_backend_matches_reference(short_chunks, batch, dim, length, d_state, groups, use_D, use_bias,
                                          softplus):
    inputs = make_inputs(batch, dim, length, d_state, groups, dtype=torch.float64,
                         delta_scale=0.3 if not softplus else 1.0, delta_shift=0.5 if not softplus else 0.0)
    if not softplus:
        inputs["delta"] = inputs["delta"].abs()  # a step size, as softplus would make it
    if not use_D:
        inputs["D"] = None
    if not use_bias:
        inputs["delta_bias"] = None
    inputs = {k: v for k, v in inputs.items() if v is not None}
    weight = torch.randn(batch, dim, length, dtype=torch.float64)
    y_ref, g_ref = run(selective_scan, inputs, weight, delta_softplus=softplus, backend="reference")
    as_f32 = {k: v.float().to(DEVICE) for k, v in inputs.items()}
    y, grads = run(selective_scan, as_f32, weight.float().to(DEVICE), delta_softplus=softplus, backend="triton")
    assert y.dtype == torch.float32
    assert close_err(y.cpu(), y_ref) < 1e-5
    for name in g_ref:
        assert grads[name].dtype == torch.float32
        assert close_err(grads[name].cpu(), g_ref[name]) < 1e-5, name


def test_16bit_inputs_keep_their_dtype_and_a_float32_state(short_chunks):
    inputs = make_inputs(2, 8, 20, 4, 2, dtype=torch.float32, device=DEVICE)
    half = with_dtype(inputs, torch.bfloat16)
    weight = torch.randn(2, 8, 20, device=DEVICE)
    y, grads = run(selective_scan, half, weight, delta_softplus=True, backend="triton")
    # the same bf16 values scanned in float32 by the chunked torch backend
    y_t, g_t = run(selective_scan, {k: v.float() for k, v in half.items()}, weight, delta_softplus=True,
                   backend="torch")
    assert y.dtype == torch.bfloat16 and grads["u"].dtype == torch.bfloat16 and grads["B"].dtype == torch.bfloat16
    assert grads["A"].dtype == torch.float32
    assert rel_err(y, y_t) < 1e-2
    for name in g_t:
        assert rel_err(grads[name], g_t[name]) < 2e-2, name


def test_large_steps_stay_finite(short_chunks):
    """Decays underflow to 0 for large delta * |A|; nothing may divide by them."""
    inputs = make_inputs(1, 8, 30, 16, 2, dtype=torch.float32, delta_scale=3.0, delta_shift=8.0)
    weight = torch.randn(1, 8, 30)
    y_ref, g_ref = run(selective_scan, {k: v.double() for k, v in inputs.items()}, weight.double(),
                       delta_softplus=True, backend="reference")
    y, grads = run(selective_scan, {k: v.to(DEVICE) for k, v in inputs.items()}, weight.to(DEVICE),
                   delta_softplus=True, backend="triton")
    assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads.values())
    assert rel_err(y.cpu(), y_ref) < 1e-5
    for name in g_ref:
        assert rel_err(grads[name].cpu(), g_ref[name]) < 1e-5, name


def test_tile_shape_keeps_a_program_inside_one_group():
    for length, channels_per_group in ((4096, 192), (64, 1536), (7, 6), (100, 1)):
        block_d, block_l = scan_kernels.tile_shape(length, 16, channels_per_group)
        assert channels_per_group % block_d == 0
        assert block_l >= min(length, scan_kernels.MAX_BLOCK_L) and block_l & (block_l - 1) == 0


def test_non_power_of_two_state_is_refused():
    inputs = {k: v.float().to(DEVICE) for k, v in make_inputs(1, 4, 5, 3, 1).items()}
    with pytest.raises(ValueError, match="power-of-two state size N, got 3"):
        selective_scan(**inputs, backend="triton")


def test_opcheck_triton_ops():
    inputs = {k: v.float().to(DEVICE) for k, v in make_inputs(1, 4, 6, 2, 2).items()}
    args = [inputs[k].clone().requires_grad_() for k in ("u", "delta", "A", "B", "C", "D", "delta_bias")]
    torch.library.opcheck(torch.ops.saumamba.scan_triton_fwd.default, (*args, True))
    plain = [inputs[k] for k in ("u", "delta", "A", "B", "C")]
    torch.library.opcheck(torch.ops.saumamba.scan_triton_bwd.default,
                          (torch.randn_like(inputs["u"]), *plain, None, None, True))


def test_triton_backend_without_gpu_or_interpreter_explains(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run: the tensors are on cpu"):
        resolve_backend("cpu", "triton")
    monkeypatch.setattr(dispatch, "triton_importable", lambda: False)
    with pytest.raises(RuntimeError, match="Triton is not installed"):
        resolve_backend("cpu", "triton")
    monkeypatch.setenv(SCAN_ENV_VAR, "triton")
    assert "triton" in SCAN_ENV_CHOICES
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run"):
        resolve_backend("cpu", kernel_policy().scan)


# ---- on the GPU, at the network's shapes (smaller batch) ----

# (batch, 4 directions x d_inner, H * W) of SS2D's scans at each stage of a 256 x 256 input
STAGE_SHAPES = [pytest.param(2, 768, 4096, id="stage1-64x64"), pytest.param(2, 1536, 1024, id="stage2-32x32"),
                pytest.param(2, 3072, 256, id="stage3-16x16"), pytest.param(2, 6144, 64, id="stage4-8x8")]


@pytest.mark.cuda
@pytest.mark.parametrize("batch,dim,length", STAGE_SHAPES)
def test_triton_matches_torch_backend_fp32_on_cuda(batch, dim, length):
    inputs = make_inputs(batch, dim, length, 16, 4, dtype=torch.float32, device="cuda", delta_shift=-3.0)
    weight = torch.randn(batch, dim, length, device="cuda")
    y, grads = run(selective_scan, inputs, weight, delta_softplus=True, backend="triton")
    y_t, g_t = run(selective_scan, inputs, weight, delta_softplus=True, backend="torch")
    errors = report(f"triton vs torch fp32 {batch}x{dim}x{length}", y, y_t, grads, g_t)
    assert max(errors.values()) < 1e-4


@pytest.mark.cuda
@pytest.mark.skipif(not kernel_available(), reason="mamba-ssm's selective_scan_cuda not importable")
@pytest.mark.parametrize("batch,dim,length", STAGE_SHAPES)
def test_triton_matches_cuda_kernel_bf16(batch, dim, length):
    inputs = with_dtype(make_inputs(batch, dim, length, 16, 4, dtype=torch.float32, device="cuda", delta_shift=-3.0),
                        torch.bfloat16)
    weight = torch.randn(batch, dim, length, device="cuda")
    y, grads = run(selective_scan, inputs, weight, delta_softplus=True, backend="triton")
    y_c, g_c = run(selective_scan, inputs, weight, delta_softplus=True, backend="cuda")
    errors = report(f"triton vs cuda kernel bf16 {batch}x{dim}x{length}", y, y_c, grads, g_c)
    assert y.dtype == torch.bfloat16
    assert max(errors.values()) < 3e-2


def test_small_steps_keep_float32_precision(short_chunks):
    """delta + bias near -7..-13 (SS2D's dt bias starts at log(1e-3)): softplus must be log1p-accurate there."""
    inputs = make_inputs(1, 8, 20, 4, 2, dtype=torch.float64, delta_scale=2.0, delta_shift=-10.0)
    del inputs["D"]  # D * u would hide the scan's part of y
    weight = torch.randn(1, 8, 20, dtype=torch.float64)
    y_ref, g_ref = run(selective_scan, inputs, weight, delta_softplus=True, backend="reference")
    y, grads = run(selective_scan, {k: v.float().to(DEVICE) for k, v in inputs.items()},
                   weight.float().to(DEVICE), delta_softplus=True, backend="triton")
    assert rel_err(y.cpu(), y_ref) < 1e-5
    for name in ("u", "delta", "B", "C", "delta_bias"):
        assert rel_err(grads[name].cpu(), g_ref[name]) < 1e-5, name
