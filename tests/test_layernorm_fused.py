"""The Triton LayerNorm and gate LayerNorm(y) * silu(z) against nn.LayerNorm and the PyTorch expression (values,
gradients of the inputs, weight and bias, output dtypes, fallback).

On a CPU machine the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py);
on a GPU the same tests run the compiled kernels, plus a full-size bf16 check marked ``cuda``.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("triton")

from nnunetv2_sa_umamba.ops.layernorm import interface as layernorm_fused  # noqa: E402
from nnunetv2_sa_umamba.ops.layernorm import layer_norm, layer_norm_gate  # noqa: E402
from nnunetv2_sa_umamba.ops.layernorm.kernels import backward_tile_shape, tile_shape  # noqa: E402
from nnunetv2_sa_umamba.ops.policy import KernelPolicy  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# the last PatchExpand's C, SS2D's d_inner at stage 1, and one that is not a power of two
CHANNELS = [24, 96, 100]
# 273 rows: several tiles for each C above, none a whole number of tiles
LEADING = (3, 7, 13)
# two bfloat16 roundings (silu(z), then the gate's product), each up to one ulp: Triton's interpreter truncates
# float32 -> bfloat16 where the GPU and PyTorch round to nearest
BF16_TOLERANCE = {"rtol": 2 ** -6, "atol": 1e-3}


def _norm(channels: int, seed: int = 0) -> nn.LayerNorm:
    torch.manual_seed(seed)
    norm = nn.LayerNorm(channels).to(DEVICE)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    return norm


def _run(fn, norm: nn.LayerNorm, x: torch.Tensor, grad: torch.Tensor):
    """fn(x)'s output and the gradients of x, norm.weight and norm.bias for upstream gradient ``grad``."""
    x = x.detach().clone().requires_grad_()
    norm.zero_grad(set_to_none=True)
    out = fn(x)
    out.backward(grad)
    return out, (x.grad, norm.weight.grad, norm.bias.grad)


def _fused_norm(x, norm, **kwargs):
    out = layer_norm(x, norm, kernels="triton", **kwargs)
    assert type(out.grad_fn).__name__ == "_LayerNormBackward", "the kernels did not run"
    return out


def _fused_gate(wide, norm, **kwargs):
    """The gate of the two halves of ``wide`` (..., 2C): z is a non-contiguous view with row stride 2C."""
    y, z = wide.chunk(2, dim=-1)
    assert not z.is_contiguous()
    out = layer_norm_gate(y, z, norm, kernels="triton", **kwargs)
    assert type(out.grad_fn).__name__ == "_LayerNormGateBackward", "the kernels did not run"
    return out


def _reference_gate(wide, norm):
    y, z = wide.chunk(2, dim=-1)
    return norm(y) * F.silu(z)


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def _assert_all_close(results, references, rel: float = 1e-5):
    pairs = zip(results, references, strict=True)
    # the names label the leading entries: some callers pass only the gradients (3 or 2 tensors)
    for name, (a, b) in zip(("output", "input grad", "weight grad", "bias grad"), pairs, strict=False):
        assert a.dtype == b.dtype, name
        assert _max_rel(a, b) < rel, name


def test_tiles_of_the_test_shapes_are_partial():
    rows = torch.Size(LEADING).numel()
    for channels in CHANNELS:
        for block_rows, block_c, *_ in (tile_shape(channels), backward_tile_shape(channels)):
            assert block_c >= channels and rows > block_rows and rows % block_rows


@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.parametrize("leading", [(LEADING[0] * LEADING[1] * LEADING[2],), LEADING])
def test_layer_norm_matches_pytorch(channels, leading):
    """(N, C) and (B, H, W, C) inputs, float32."""
    norm = _norm(channels)
    x = torch.randn(*leading, channels, device=DEVICE) * 2 + 0.5
    grad = torch.randn_like(x)
    out, grads = _run(lambda t: _fused_norm(t, norm), norm, x, grad)
    out_ref, grads_ref = _run(norm, norm, x, grad)
    _assert_all_close((out, *grads), (out_ref, *grads_ref))


def test_layer_norm_of_a_channel_last_view():
    """x (B, H, W, C) as a permuted (B, C, H, W) tensor: the last dimension has stride H*W."""
    norm = _norm(24)
    x = torch.randn(2, 24, 5, 7, device=DEVICE).permute(0, 2, 3, 1)
    grad = torch.randn(x.shape, device=DEVICE)
    out, grads = _run(lambda t: _fused_norm(t.permute(0, 2, 3, 1), norm), norm, x.permute(0, 3, 1, 2), grad)
    out_ref, grads_ref = _run(lambda t: norm(t.permute(0, 2, 3, 1)), norm, x.permute(0, 3, 1, 2), grad)
    _assert_all_close((out, *grads), (out_ref, *grads_ref))


@pytest.mark.parametrize("channels", CHANNELS)
def test_gate_matches_pytorch(channels):
    """y and z the halves of a (B, H, W, 2C) tensor, as SS2D's in_proj output: the gradient of both."""
    norm = _norm(channels)
    wide = torch.randn(*LEADING, 2 * channels, device=DEVICE) * 2
    grad = torch.randn(*LEADING, channels, device=DEVICE)
    out, grads = _run(lambda t: _fused_gate(t, norm), norm, wide, grad)
    out_ref, grads_ref = _run(lambda t: _reference_gate(t, norm), norm, wide, grad)
    _assert_all_close((out, *grads), (out_ref, *grads_ref))


def _op(norm: nn.LayerNorm, gate: bool, **kwargs):
    """(fused function, PyTorch expression, input width in multiples of C) of the LayerNorm or the gate."""
    if gate:
        return (lambda t: _fused_gate(t, norm, **kwargs)), (lambda t: _reference_gate(t, norm)), 2
    return (lambda t: _fused_norm(t, norm, **kwargs)), norm, 1


# (rows, C): two rows (the gate's z is then still a strided view); fewer rows than one backward tile; one row per
# tile (C = 1536, PatchMerging's widest, where the backward's tile holds a single row) with an odd number of tiles,
# so a program's second tile is all padding
EDGE_SHAPES = [(2, 24), (5, 100), (3, 1536), (7, 1536)]


@pytest.mark.parametrize("gate", [False, True], ids=["layer_norm", "gate"])
@pytest.mark.parametrize("rows,channels", EDGE_SHAPES)
def test_tile_edges_match_pytorch(rows, channels, gate):
    block_rows, _, _, tiles_per_program = backward_tile_shape(channels)
    if channels == 1536:
        assert block_rows == 1 and tiles_per_program > 1 and rows % tiles_per_program
    norm = _norm(channels)
    fused_fn, reference_fn, width = _op(norm, gate)
    inputs = torch.randn(rows, width * channels, device=DEVICE) * 2 + 0.5
    grad = torch.randn(rows, channels, device=DEVICE)
    out, grads = _run(fused_fn, norm, inputs, grad)
    out_ref, grads_ref = _run(reference_fn, norm, inputs, grad)
    _assert_all_close((out, *grads), (out_ref, *grads_ref))


@pytest.mark.parametrize("gate", [False, True], ids=["layer_norm", "gate"])
def test_bfloat16_output_is_the_float32_result_rounded(gate):
    norm = _norm(100)
    fused_fn, reference_fn, width = _op(norm, gate, out_dtype=torch.bfloat16)
    inputs = torch.randn(*LEADING, width * 100, device=DEVICE)
    grad = torch.randn(*LEADING, 100, device=DEVICE).bfloat16()  # bf16 values, the same in float32
    out, grads = _run(fused_fn, norm, inputs, grad)
    out_ref, grads_ref = _run(reference_fn, norm, inputs, grad.float())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, out_ref.bfloat16(), **BF16_TOLERANCE)
    # the backward sees the same gradient values as the float32 reference
    _assert_all_close(grads, grads_ref)


@pytest.mark.parametrize("gate", [False, True], ids=["layer_norm", "gate"])
def test_bfloat16_inputs_with_float32_parameters(gate):
    """x (or y, z) bf16: the result in bf16 as nn.LayerNorm's mixed-dtype kernel gives it; float32 parameter
    gradients; input gradients in bf16."""
    norm = _norm(96)
    fused_fn, reference_fn, width = _op(norm, gate)
    inputs = torch.randn(*LEADING, width * 96, device=DEVICE).bfloat16()
    grad = torch.randn(*LEADING, 96, device=DEVICE).bfloat16()
    out, (grad_in, grad_weight, grad_bias) = _run(fused_fn, norm, inputs, grad)
    # float32 reference from the same (exactly representable) values
    out_ref, (grad_in_ref, grad_weight_ref, grad_bias_ref) = _run(reference_fn, norm, inputs.float(), grad.float())
    assert out.dtype == grad_in.dtype == torch.bfloat16
    assert grad_weight.dtype == grad_bias.dtype == torch.float32
    torch.testing.assert_close(out, out_ref.bfloat16(), **BF16_TOLERANCE)
    assert _max_rel(grad_in, grad_in_ref) < 1e-2
    # the gate's float32 reference keeps silu(z) unrounded; the kernel rounds it to bf16 as F.silu does
    _assert_all_close((grad_weight, grad_bias), (grad_weight_ref, grad_bias_ref), 1e-2 if gate else 1e-5)


def test_default_dtypes_follow_autocast():
    """Under autocast: the same dtype and values as nn.LayerNorm and the PyTorch gate expression (float32 on
    CUDA, whose autocast runs layer_norm in float32; bf16 on the CPU, whose autocast leaves it alone)."""
    norm = _norm(24)
    x = torch.randn(*LEADING, 24, device=DEVICE).bfloat16()
    wide = torch.randn(*LEADING, 48, device=DEVICE).bfloat16()
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        pairs = [(_fused_norm(x, norm), norm(x)), (_fused_gate(wide, norm), _reference_gate(wide, norm))]
    for out, ref in pairs:
        assert out.dtype == ref.dtype
        if ref.dtype == torch.float32:
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        else:  # the CPU's PyTorch gate also rounds norm(y) to bf16 before the product: two more roundings
            torch.testing.assert_close(out, ref, rtol=2 ** -5, atol=1e-3)


def test_kernels_run_under_deterministic_algorithms():
    """dweight and dbias come from partial sums added by torch, not atomics: the same bits every run."""
    norm = _norm(24)
    x = torch.randn(*LEADING, 24, device=DEVICE)
    grad = torch.randn_like(x)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [_run(lambda t: _fused_norm(t, norm), norm, x, grad)[1] for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(previous)
    for first, second in zip(*runs, strict=True):
        assert torch.equal(first, second)


def test_pytorch_operations_for_kernels_torch(monkeypatch):
    """kernels="torch": the PyTorch expressions themselves, bit for bit, and no kernel."""
    def no_kernels():
        raise AssertionError("the Triton kernels were loaded")

    monkeypatch.setattr(layernorm_fused, "_kernels", no_kernels)
    norm = _norm(100)
    x = torch.randn(*LEADING, 100, device=DEVICE)
    wide = torch.randn(*LEADING, 200, device=DEVICE)
    grad = torch.randn(x.shape, device=DEVICE)
    for fn, reference_fn, inputs in (
            (lambda t: layer_norm(t, norm, kernels="torch"), norm, x),
            (lambda t: layer_norm_gate(*t.chunk(2, dim=-1), norm, kernels="torch"), lambda t: _reference_gate(t, norm),
             wide)):
        out, grads = _run(fn, norm, inputs, grad)
        out_ref, grads_ref = _run(reference_fn, norm, inputs, grad)
        for a, b in zip((out, *grads), (out_ref, *grads_ref), strict=True):
            assert torch.equal(a, b)
    assert layer_norm(x, norm, out_dtype=torch.bfloat16, kernels="torch").dtype == torch.bfloat16


@pytest.mark.cuda
def test_full_size_under_bf16_autocast():
    """SS2D's stage-1 gate and a LayerNorm at 28 x 64 x 64 rows x 192 channels, bf16 autocast, against PyTorch."""
    norm = _norm(192)
    x = torch.randn(28, 64, 64, 192, device="cuda").bfloat16()
    wide = torch.randn(28, 64, 64, 384, device="cuda").bfloat16()
    grad = torch.randn(x.shape, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, grads = _run(lambda t: _fused_norm(t, norm), norm, x, grad)
        gate_out, gate_grads = _run(lambda t: _fused_gate(t, norm), norm, wide, grad)
        gate_ref, gate_grads_ref = _run(lambda t: _reference_gate(t, norm), norm, wide, grad)
    # PyTorch's autocast layer_norm is this float32 computation
    out_ref, grads_ref = _run(norm, norm, x.float(), grad)
    errors = {"layer_norm": [_max_rel(a, b) for a, b in zip((out, *grads), (out_ref, *grads_ref), strict=True)],
              "gate": [_max_rel(a, b)
                       for a, b in zip((gate_out, *gate_grads), (gate_ref, *gate_grads_ref), strict=True)]}
    for name, (e_out, e_in, e_weight, e_bias) in errors.items():
        print(f"\n{name}: max relative error output {e_out:.1e}, input grad {e_in:.1e}, "
              f"weight grad {e_weight:.1e}, bias grad {e_bias:.1e}")
    assert out.dtype == gate_out.dtype == torch.float32
    e_out, e_in, e_weight, e_bias = errors["layer_norm"]
    assert e_out < 1e-5 and max(e_weight, e_bias) < 1e-4
    assert e_in < 1e-2  # rounded to bf16
    # both sides round silu(z) to bf16, and a float32 difference can flip a rounding near a tie; PyTorch's
    # backward also rounds dL/dsilu to bf16
    assert max(errors["gate"]) < 1e-2


def test_network_layer_norm_runs_fused_only_on_the_fast_path():
    """blocks.LayerNorm sends the fast path's rows, short and long (the final PatchExpand's 24 channels, PatchMerging's
    1536), to the kernels, with nn.LayerNorm's values; the reference implementation never uses the kernels."""
    from nnunetv2_sa_umamba.modules.blocks import LayerNorm

    for channels, implementation, expect_fused in ((24, "fast", True), (1536, "fast", True),
                                                   (24, "reference", False), (1536, "reference", False)):
        norm = LayerNorm(channels, KernelPolicy(implementation=implementation, layernorm="triton")).to(DEVICE)
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
        x = torch.randn(2, 3, 5, channels, device=DEVICE, requires_grad=True)
        out = norm(x, feeds_matmul=True)
        assert (type(out.grad_fn).__name__ == "_LayerNormBackward") == expect_fused, (channels, implementation)
        torch.testing.assert_close(out, F.layer_norm(x, (channels,), norm.weight, norm.bias, norm.eps),
                                   rtol=1e-5, atol=1e-5)


def test_network_layer_norm_is_left_to_torch_compile_while_it_traces(monkeypatch):
    """Under torch.compile's tracing the fast path's LayerNorm is PyTorch's (Inductor fuses it), not the kernel,
    whose op would break the compiled graph."""
    from nnunetv2_sa_umamba.modules.blocks import LayerNorm

    norm = LayerNorm(96, KernelPolicy(layernorm="triton")).to(DEVICE)
    x = torch.randn(2, 3, 96, device=DEVICE, requires_grad=True)
    assert type(norm(x).grad_fn).__name__ == "_LayerNormBackward"
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert type(norm(x).grad_fn).__name__ == "NativeLayerNormBackward0"


def test_wrong_channel_count_is_refused_as_pytorch_refuses_it():
    with pytest.raises(RuntimeError, match=r"expected input with shape \[\*, 24\]"):
        layer_norm(torch.randn(4, 16, device=DEVICE), _norm(24).to(DEVICE), kernels="triton")
