"""Selective-scan backends: the chunked ``torch`` backend and mamba-ssm's ``cuda`` kernel against the
sequential reference, backend selection, logging, torch.library registration and torch.compile.

CUDA tests (marked ``cuda``) print their largest errors; run them with ``pytest -m cuda -s``.
"""
import logging
from functools import partial

import pytest
import torch

from nnunetv2_sa_umamba.ops.policy import SCAN_ENV_VAR as ENV
from nnunetv2_sa_umamba.ops.policy import kernel_policy
from nnunetv2_sa_umamba.ops.scan import (
    available_backends,
    resolve_backend,
    selective_scan,
    selective_scan_lowrank_delta,
)
from nnunetv2_sa_umamba.ops.scan import cuda_backend as scan_cuda
from nnunetv2_sa_umamba.ops.scan import interface as dispatch
from nnunetv2_sa_umamba.ops.scan.reference import selective_scan_reference
from nnunetv2_sa_umamba.ops.scan.torch_backend import selective_scan_torch


def make_inputs(batch=2, dim=8, length=37, d_state=4, groups=2, dtype=torch.float64, device="cpu",
                delta_scale=1.0, delta_shift=0.0, seed=0):
    """Random scan inputs; A = -(1..N) per channel as SS2D initialises it, times a random factor."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    A = -torch.arange(1, d_state + 1, dtype=torch.float64).repeat(dim, 1) * (0.2 + torch.rand(
        dim, 1, generator=g, dtype=torch.float64))
    tensors = dict(u=randn(batch, dim, length), delta=randn(batch, dim, length) * delta_scale + delta_shift,
                   A=A, B=randn(batch, groups, d_state, length), C=randn(batch, groups, d_state, length),
                   D=randn(dim), delta_bias=randn(dim) * 0.5)
    return {k: v.to(device=device, dtype=dtype) for k, v in tensors.items()}


SCAN_DATA = ("u", "delta", "B", "C")  # the inputs that the kernels take in 16 bits; A, D, delta_bias stay float32


def with_dtype(inputs, dtype, names=SCAN_DATA):
    """``inputs`` with the tensors ``names`` cast to ``dtype``, the others as they are."""
    return {k: v.to(dtype) if k in names else v for k, v in inputs.items()}


def run(fn, inputs, weight, **kwargs):
    """Output and gradients of sum(fn(...) * weight) for every input tensor (None where unused)."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    y = fn(**leaves, **kwargs)
    (y.float() * weight).sum().backward()
    return y.detach(), {k: v.grad for k, v in leaves.items()}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute error relative to the largest reference magnitude."""
    x, ref = x.double(), ref.double()
    return ((x - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


CASES = [  # batch, dim, L, N, groups, chunk_len, use D, use delta_bias, softplus
    pytest.param(2, 8, 1, 4, 2, 16, True, True, True, id="L1"),
    pytest.param(2, 8, 37, 4, 1, 16, True, True, True, id="L37-chunk16-groups1"),
    pytest.param(1, 16, 50, 16, 4, 7, False, False, False, id="L50-chunk7-groups4-noD-nobias-nosoftplus"),
    pytest.param(2, 8, 64, 4, 4, 16, True, False, True, id="L64-exact-chunks-groups4-nobias"),
    pytest.param(1, 4, 20, 3, 2, 64, False, True, False, id="L20-one-short-chunk"),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("batch,dim,length,d_state,groups,chunk_len,use_D,use_bias,softplus", CASES)
def test_torch_backend_matches_reference(dtype, batch, dim, length, d_state, groups, chunk_len, use_D,
                                         use_bias, softplus):
    inputs = make_inputs(batch, dim, length, d_state, groups, dtype=torch.float64)
    if not use_D:
        inputs.pop("D")
    if not use_bias:
        inputs.pop("delta_bias")
    if not softplus:  # keep delta (+ bias) positive, as softplus would: a negative step grows the state
        inputs.update({k: inputs[k].abs() for k in ("delta", "delta_bias") if k in inputs})
    weight = torch.randn(batch, dim, length, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y_ref, g_ref = run(selective_scan_reference, inputs, weight, delta_softplus=softplus)
    cast = {k: v.to(dtype) for k, v in inputs.items()}
    y, grads = run(selective_scan_torch, cast, weight.to(dtype), delta_softplus=softplus, chunk_len=chunk_len)
    # float64 runs the same algebra in float64, so it must agree far below float32 rounding
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    assert y.dtype == dtype and y.shape == (batch, dim, length)
    assert rel_err(y, y_ref) < tol
    assert set(grads) == set(g_ref)
    for name in g_ref:
        assert grads[name].dtype == dtype and grads[name].shape == inputs[name].shape, name
        assert rel_err(grads[name], g_ref[name]) < tol, name


def test_long_sequence_with_large_delta_stays_finite_and_accurate():
    # delta * A down to about -150 per step next to near-zero steps: any exp(+cumsum) form overflows here
    inputs = make_inputs(1, 8, 3136, 16, 2, delta_scale=4.0)
    weight = torch.randn(1, 8, 3136, dtype=torch.float64)
    y_ref, g_ref = run(selective_scan_reference, inputs, weight, delta_softplus=True)
    y, grads = run(selective_scan_torch, {k: v.float() for k, v in inputs.items()}, weight.float(),
                   delta_softplus=True)
    assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads.values())
    assert rel_err(y, y_ref) < 2e-5
    for name in g_ref:
        assert rel_err(grads[name], g_ref[name]) < 2e-5, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_backend_16bit_inputs_run_in_float32(dtype):
    inputs = with_dtype(make_inputs(dtype=torch.float32), dtype)
    y = selective_scan(**inputs, delta_softplus=True, backend="torch")
    y_f32 = selective_scan_reference(**{k: v.float() for k, v in inputs.items()}, delta_softplus=True)
    assert y.dtype == dtype
    # within one 16-bit rounding of the float32 computation on the same inputs
    torch.testing.assert_close(y.float(), y_f32, rtol=torch.finfo(dtype).eps, atol=1e-6)


def test_compute_dtype_sets_input_rounding_and_output_dtype():
    inputs = {k: v.float() for k, v in make_inputs().items()}
    y_bf16 = selective_scan(**inputs, delta_softplus=True, backend="torch", compute_dtype=torch.bfloat16)
    rounded = {k: v.float() for k, v in with_dtype(inputs, torch.bfloat16).items()}
    assert y_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(y_bf16.float(), selective_scan_reference(**rounded, delta_softplus=True),
                               rtol=torch.finfo(torch.bfloat16).eps, atol=1e-6)

    half = with_dtype(inputs, torch.float16)
    y_f32 = selective_scan(**half, delta_softplus=True, backend="torch", compute_dtype=torch.float32)
    assert y_f32.dtype == torch.float32
    expected = selective_scan_reference(**{k: v.float() for k, v in half.items()}, delta_softplus=True)
    torch.testing.assert_close(y_f32, expected)
    with pytest.raises(ValueError, match="compute_dtype"):
        selective_scan(**inputs, backend="torch", compute_dtype=torch.float16)


def test_torch_backend_saves_chunk_states_not_every_step():
    """Memory bound: autograd keeps the inputs and one (batch, dim, N) state per chunk, while the
    reference keeps several (batch, dim, N) tensors per step."""
    batch, dim, length, d_state = 2, 32, 256, 32
    inputs = {k: v.float().requires_grad_() for k, v in make_inputs(batch, dim, length, d_state, 1).items()}

    def saved_numel(fn):
        sizes = []

        def pack(t):
            sizes.append(t.numel())
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(**inputs, delta_softplus=True)
        return sum(sizes)

    full_states = batch * dim * d_state * length
    assert saved_numel(partial(selective_scan_torch, chunk_len=64)) < full_states / 2
    assert saved_numel(selective_scan_reference) > 2 * full_states


def test_opcheck_torch_op():
    inputs = make_inputs()
    u, A, B, C = inputs["u"], inputs["A"], inputs["B"], inputs["C"]
    delta = torch.nn.functional.softplus(inputs["delta"])
    args = [t.clone().requires_grad_() for t in (u, delta, A, B, C)]
    torch.library.opcheck(torch.ops.saumamba.scan_torch_fwd.default, (*args, 5))
    y, states = torch.ops.saumamba.scan_torch_fwd(u, delta, A, B, C, 5)
    assert states.shape == (8, 2, 2, 4, 4)  # ceil(37 / 5) chunks of (batch, groups, dim // groups, N)
    torch.library.opcheck(torch.ops.saumamba.scan_torch_bwd.default,
                          (torch.randn_like(y), u, delta, A, B, C, states, 5))


def test_compile_keeps_scan_in_one_graph_cpu():
    inputs = {k: v.float() for k, v in make_inputs().items()}

    def f(u, delta, A, B, C, D, delta_bias):
        return selective_scan(u.sin(), delta, A, B, C, D, delta_bias, delta_softplus=True).cos()

    assert torch._dynamo.explain(f)(**inputs).graph_break_count == 0
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    weight = torch.randn(2, 8, 37)
    y_c, g_c = run(compiled, inputs, weight)
    y_e, g_e = run(f, inputs, weight)
    torch.testing.assert_close(y_c, y_e)
    for name in g_e:
        torch.testing.assert_close(g_c[name], g_e[name])


# ---- backend selection and logging ----

def test_resolve_backend_defaults_and_env(monkeypatch):
    """The environment variable reaches the scan through the kernel policy, never directly."""
    monkeypatch.delenv(ENV, raising=False)
    assert resolve_backend("cpu") == "torch"
    monkeypatch.setenv(ENV, "auto")
    assert resolve_backend("cpu", kernel_policy().scan) == "torch"
    monkeypatch.setenv(ENV, "TORCH")
    assert resolve_backend(torch.device("cpu"), kernel_policy().scan) == "torch"
    # the argument wins over the variable
    assert resolve_backend("cpu", kernel_policy(scan="reference").scan) == "reference"
    for value in ("reference", "mamba"):  # the reference is not a user setting
        monkeypatch.setenv(ENV, value)
        with pytest.raises(ValueError, match=f"{ENV}='{value}'"):
            kernel_policy()
        assert resolve_backend("cpu") == "torch"  # the scan itself does not read the variable
    with pytest.raises(ValueError, match="unknown selective-scan backend 'fast'"):
        resolve_backend("cpu", "fast")


def test_auto_picks_kernel_only_for_cuda_tensors_with_kernel(monkeypatch):
    monkeypatch.setattr(scan_cuda, "kernel_available", lambda: True)
    assert resolve_backend("cuda:0") == "cuda"
    assert resolve_backend("cpu") == "torch"
    monkeypatch.setattr(scan_cuda, "kernel_available", lambda: False)
    monkeypatch.setattr(dispatch, "triton_importable", lambda: True)
    assert resolve_backend("cuda:0") == "triton"
    assert resolve_backend("cpu") == "torch"
    monkeypatch.setattr(dispatch, "triton_importable", lambda: False)
    assert resolve_backend("cuda:0") == "torch"


@pytest.mark.parametrize("via_env", [False, True])
def test_cuda_backend_on_cpu_explains_how_to_install(monkeypatch, via_env):
    monkeypatch.setenv(ENV, "cuda" if via_env else "auto")
    inputs = {k: v.float() for k, v in make_inputs().items()}
    with pytest.raises(RuntimeError) as err:
        selective_scan(**inputs, backend=kernel_policy().scan if via_env else "cuda")
    message = str(err.value)
    assert "not on a CUDA device" in message
    assert 'MAMBA_FORCE_BUILD=TRUE pip install -e ".[cuda]"' in message
    if not scan_cuda.kernel_available():
        assert "selective_scan_cuda does not import" in message


def test_available_backends_lists_what_runs_here():
    names = available_backends()
    assert "torch" in names and "reference" in names
    assert ("cuda" in names) == (torch.cuda.is_available() and scan_cuda.kernel_available())


def test_backend_is_logged_once(monkeypatch, caplog):
    monkeypatch.setattr(dispatch, "_logged", set())
    inputs = {k: v.float() for k, v in make_inputs(length=5).items()}
    with caplog.at_level(logging.INFO, logger="nnunetv2_sa_umamba"):
        for _ in range(3):
            selective_scan(**inputs)
        selective_scan(**inputs, backend="reference")
        selective_scan(**inputs, backend="reference")
    lines = [r.getMessage() for r in caplog.records if r.name == "nnunetv2_sa_umamba"]
    assert len(lines) == 2
    assert lines[0].startswith("selective scan backend: torch")
    assert lines[1].startswith("selective scan backend: reference")


def test_bad_shapes_name_the_argument():
    inputs = {k: v.float() for k, v in make_inputs().items()}
    with pytest.raises(ValueError, match=r"B must be \(batch=2, groups, N=4, L=37\).*B.unsqueeze\(1\)"):
        selective_scan(**{**inputs, "B": inputs["B"][:, 0]}, backend="torch")
    with pytest.raises(ValueError, match="groups dividing dim=8"):
        selective_scan(**{**inputs, "B": inputs["B"][:, :1].expand(2, 3, 4, 37),
                          "C": inputs["C"][:, :1].expand(2, 3, 4, 37)}, backend="torch")
    with pytest.raises(ValueError, match=r"D must be \(dim=8,\)"):
        selective_scan(**{**inputs, "D": inputs["D"][:4]}, backend="torch")


def lowrank_inputs(batch=2, groups=2, dim_per_group=4, rank=3, length=37, dtype=torch.float64, device="cpu"):
    """Scan inputs whose delta is delta_weight @ delta_low per group, as SS2D forms it."""
    inputs = make_inputs(batch, groups * dim_per_group, length, 4, groups, dtype=dtype, device=device)
    del inputs["delta"]
    g = torch.Generator().manual_seed(1)
    inputs["delta_low"] = torch.randn(batch, groups, rank, length, generator=g, dtype=torch.float64).to(device, dtype)
    inputs["delta_weight"] = (torch.randn(groups, dim_per_group, rank, generator=g, dtype=torch.float64) * 0.5).to(
        device, dtype)
    return inputs


def projected_then_scanned(delta_low, delta_weight, backend, **inputs):
    """delta formed channel by channel (channel g * dim_per_group + j of group g), then the plain scan."""
    groups, dim_per_group, _ = delta_weight.shape
    delta = torch.cat([torch.einsum("jr,brl->bjl", delta_weight[g], delta_low[:, g]) for g in range(groups)], 1)
    return selective_scan(delta=delta, backend=backend, **inputs)


def test_lowrank_delta_scan_matches_projected_delta():
    inputs = lowrank_inputs()
    weight = torch.randn(2, 8, 37, dtype=torch.float64)
    y, grads = run(selective_scan_lowrank_delta, inputs, weight, delta_softplus=True, backend="torch")
    y_ref, g_ref = run(projected_then_scanned, inputs, weight, delta_softplus=True, backend="reference")
    assert rel_err(y, y_ref) < 1e-10
    assert max(rel_err(grads[k], g_ref[k]) for k in g_ref) < 1e-10


def test_lowrank_delta_shapes_are_checked():
    inputs = lowrank_inputs()
    with pytest.raises(ValueError, match="delta_weight \\(groups, dim / groups, R\\)"):
        selective_scan_lowrank_delta(**{**inputs, "delta_weight": inputs["delta_weight"][:, :3]}, backend="torch")


# ---- CUDA kernel (run on a GPU with mamba-ssm's selective_scan_cuda built) ----

needs_kernel = pytest.mark.skipif(not scan_cuda.kernel_available(),
                                  reason=f"selective_scan_cuda not importable: {scan_cuda.kernel_import_error()}")
GPU_SHAPES = [pytest.param(2, 96, 300, id="L300"), pytest.param(1, 64, 2500, id="L2500-two-kernel-chunks")]


def report(title, y, y_ref, grads, g_ref):
    errors = {"out": rel_err(y, y_ref), **{f"d{k}": rel_err(grads[k], g_ref[k]) for k in g_ref}}
    print(f"\n{title}: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    return errors


@pytest.mark.cuda
@needs_kernel
@pytest.mark.parametrize("batch,dim,length", GPU_SHAPES)
def test_cuda_matches_torch_backend_fp32(batch, dim, length):
    inputs = make_inputs(batch, dim, length, 16, 4, dtype=torch.float32, device="cuda")
    weight = torch.randn(batch, dim, length, device="cuda")
    y, grads = run(selective_scan, inputs, weight, delta_softplus=True, backend="cuda")
    y_t, g_t = run(selective_scan, inputs, weight, delta_softplus=True, backend="torch")
    errors = report(f"cuda vs torch fp32 {batch}x{dim}x{length}", y, y_t, grads, g_t)
    assert y.dtype == torch.float32
    assert max(errors.values()) < 1e-4


@pytest.mark.cuda
@needs_kernel
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)], ids=["bf16", "fp16"])
def test_cuda_16bit_inputs_match_torch_backend(dtype, tol):
    """Same 16-bit inputs to both backends; both keep a float32 state, so they differ by rounding."""
    inputs = with_dtype(make_inputs(2, 96, 300, 16, 4, dtype=torch.float32, device="cuda"), dtype)
    weight = torch.randn(2, 96, 300, device="cuda")
    y, grads = run(selective_scan, inputs, weight, delta_softplus=True, backend="cuda")
    y_t, g_t = run(selective_scan, inputs, weight, delta_softplus=True, backend="torch")
    errors = report(f"cuda vs torch {dtype}", y, y_t, grads, g_t)
    assert y.dtype == dtype and grads["u"].dtype == dtype
    assert max(errors.values()) < tol


@pytest.mark.cuda
@needs_kernel
def test_cuda_under_fp16_autocast_with_bf16_compute():
    """nnU-Net trains under float16 autocast: bf16 scan inputs keep the output finite where the
    kernel's float16 output would overflow."""
    inputs = make_inputs(2, 64, 512, 16, 4, dtype=torch.float32, device="cuda")
    # positive u, B, C and a memory of tens of steps: |y| ~ 1e6, beyond float16's 65504
    inputs.update(u=inputs["u"].abs() * 5e3 + 2e4, delta=inputs["delta"] * 0.3 - 1,
                  B=inputs["B"].abs(), C=inputs["C"].abs())
    proj = torch.nn.Linear(64, 64, bias=False, device="cuda")
    torch.nn.init.eye_(proj.weight)

    def f(u, delta, A, B, C, D, delta_bias, compute_dtype):
        u = proj(u.transpose(1, 2)).transpose(1, 2)  # float16 under autocast, like a network's projection
        return selective_scan(u, delta, A, B, C, D, delta_bias, delta_softplus=True, backend="cuda",
                              compute_dtype=compute_dtype)

    weight = torch.randn(2, 64, 512, device="cuda")
    y_ref, g_ref = run(f, inputs, weight, compute_dtype=None)  # float32, no autocast
    with torch.autocast("cuda", dtype=torch.float16):
        y_fp16 = f(**inputs, compute_dtype=None)
        y, grads = run(f, inputs, weight, compute_dtype=torch.bfloat16)
    errors = report("fp16 autocast + bf16 compute vs fp32", y, y_ref, grads, g_ref)
    print(f"max |y| {y_ref.abs().max().item():.3g}; plain float16 kernel output finite: "
          f"{torch.isfinite(y_fp16).all().item()}")
    assert y_fp16.dtype == torch.float16 and y.dtype == torch.bfloat16
    assert y_ref.abs().max() > 65504  # the case the option exists for
    assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads.values())
    assert max(errors.values()) < 5e-2


@pytest.mark.cuda
@needs_kernel
@pytest.mark.parametrize("optional", [True, False], ids=["with-D-bias", "without-D-bias"])
def test_opcheck_cuda_op(optional):
    inputs = make_inputs(2, 32, 100, 16, 4, dtype=torch.float32, device="cuda")
    D, bias = (inputs["D"], inputs["delta_bias"]) if optional else (None, None)
    args = [inputs[k].clone().requires_grad_() for k in ("u", "delta", "A", "B", "C")]
    extra = [None if t is None else t.clone().requires_grad_() for t in (D, bias)]
    torch.library.opcheck(torch.ops.saumamba.scan_cuda_fwd.default, (*args, *extra, True))
    plain = [inputs[k] for k in ("u", "delta", "A", "B", "C")]
    out, x = torch.ops.saumamba.scan_cuda_fwd(*plain, D, bias, True)
    torch.library.opcheck(torch.ops.saumamba.scan_cuda_bwd.default,
                          (torch.randn_like(out), *plain, D, bias, x, True))


@pytest.mark.cuda
@needs_kernel
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("scan_forward,scan_backward", [("torch", "torch"), ("triton", "torch"), ("triton", "triton"),
                                                        ("torch", "triton")],
                         ids=["mamba-both", "sequential-forward", "sequential-both", "sequential-backward"])
def test_cuda_lowrank_delta_matches_torch_backend(dtype, tol, scan_forward, scan_backward):
    """The op that recomputes delta in its backward, with mamba-ssm's forward and backward or the sequential Triton
    ones: forward and every gradient (delta_low and delta_weight included) against the torch backend on the projected
    delta."""
    inputs = with_dtype(lowrank_inputs(2, 4, 24, 6, 300, dtype=torch.float32, device="cuda"), dtype,
                        ("u", "delta_low", "delta_weight", "B", "C"))
    weight = torch.randn(2, 96, 300, device="cuda")
    y, grads = run(selective_scan_lowrank_delta, inputs, weight, delta_softplus=True, backend="cuda",
                   scan_forward=scan_forward, scan_backward=scan_backward)
    y_t, g_t = run(projected_then_scanned, inputs, weight, delta_softplus=True, backend="torch")
    errors = report(f"cuda low-rank delta ({scan_forward} forward, {scan_backward} backward) vs torch {dtype}", y,
                    y_t, grads, g_t)
    assert y.dtype == dtype and grads["delta_weight"].dtype == dtype
    assert max(errors.values()) < tol
    args = [inputs[k].clone().requires_grad_() for k in ("u", "delta_low", "delta_weight", "A", "B", "C", "D",
                                                             "delta_bias")]
    torch.library.opcheck(torch.ops.saumamba.scan_cuda_lowrank_delta_fwd.default,
                          (*args, True, scan_forward == "triton", scan_backward == "triton"))


@pytest.mark.cuda
@needs_kernel
def test_compile_keeps_cuda_scan_in_one_graph():
    inputs = make_inputs(2, 64, 256, 16, 4, dtype=torch.float32, device="cuda")
    assert resolve_backend(inputs["u"].device) == "cuda"

    def f(u, delta, A, B, C, D, delta_bias):
        return selective_scan(u.sin(), delta, A, B, C, D, delta_bias, delta_softplus=True).cos()

    explanation = torch._dynamo.explain(f)(**inputs)
    print(f"\ngraphs {explanation.graph_count}, graph breaks {explanation.graph_break_count}")
    assert explanation.graph_break_count == 0
    weight = torch.randn(2, 64, 256, device="cuda")
    y_c, g_c = run(torch.compile(f, fullgraph=True), inputs, weight)
    y_e, g_e = run(f, inputs, weight)
    errors = report("compiled vs eager", y_c, y_e, g_c, g_e)
    assert max(errors.values()) < 1e-5
