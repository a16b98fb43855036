"""RFAConv's fused Triton chain against the released code's operations (forward, every gradient, BN statistics).

On a CPU machine the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py);
on a GPU the same tests run the compiled kernels, plus a full-size bf16 check marked ``cuda``.
"""
import copy
from dataclasses import replace

import pytest
import torch

pytest.importorskip("triton")

from nnunetv2_sa_umamba.architectures.sa_umamba import SAUMamba  # noqa: E402
from nnunetv2_sa_umamba.modules.rfaconv import RFAConv  # noqa: E402
from nnunetv2_sa_umamba.ops.common import triton_interpreted  # noqa: E402
from nnunetv2_sa_umamba.ops.policy import KernelPolicy  # noqa: E402
from nnunetv2_sa_umamba.ops.rfaconv import interface as rfaconv_fused  # noqa: E402
from nnunetv2_sa_umamba.ops.rfaconv import kernels as rfaconv_kernels  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FUSED = KernelPolicy(rfaconv="triton")


def _pair(channels: int, seed: int = 0):
    """The same RFAConv with the fused kernels and with the released code's operations."""
    torch.manual_seed(seed)
    fast = RFAConv(channels, kernels=FUSED).to(DEVICE)
    with torch.no_grad():  # non-trivial BN affine parameters and running statistics
        for bn in (fast.feature_norm, fast.out_norm):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
    reference = copy.deepcopy(fast)
    reference.kernels = KernelPolicy(implementation="reference")
    return fast, reference


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _norm_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _run(module, x, grad, channels_last):
    x = x.clone().requires_grad_()
    y = module(x, channels_last=channels_last)
    y.backward(grad)
    return y, x.grad, {name: p.grad for name, p in module.named_parameters()}


@pytest.mark.parametrize("shape", [(2, 7, 9, 16), (1, 5, 5, 20), (3, 1, 6, 8)])
@pytest.mark.parametrize("train", [True, False])
def test_fused_matches_reference(shape, train):
    """Channel counts not a multiple of the kernels' block, one-row images, train and eval BN."""
    fast, reference = _pair(shape[-1])
    fast.train(train)
    reference.train(train)
    x = torch.randn(shape, device=DEVICE)
    grad = torch.randn(shape, device=DEVICE)
    y_fast, gx_fast, grads_fast = _run(fast, x, grad, channels_last=True)
    y_ref, gx_ref, grads_ref = _run(reference, x, grad, channels_last=True)
    assert _max_rel(y_fast, y_ref) < 1e-5
    assert _max_rel(gx_fast, gx_ref) < 1e-5
    scale = max(g.abs().max().item() for g in grads_ref.values())
    for name, g_ref in grads_ref.items():
        # the stride-3 conv's bias feeds a BatchNorm, so its true gradient is 0: compare on the common scale
        assert (grads_fast[name] - g_ref).abs().max().item() <= 1e-5 * scale, name
    for buffer in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(fast.feature_norm, buffer), getattr(reference.feature_norm, buffer),
                                   rtol=1e-5, atol=1e-7)


def test_nchw_interface_matches_channels_last():
    fast, _ = _pair(16)
    x = torch.randn(2, 6, 7, 16, device=DEVICE)
    torch.testing.assert_close(fast(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1), fast(x, channels_last=True))


@pytest.mark.slow  # the whole network in Triton's CPU interpreter: 20 s; the kernels alone are tested above
def test_network_with_fused_rfaconv_matches_unfused(monkeypatch):
    """The whole network, fused vs unfused RFAConv and nothing else switched (the other operators run PyTorch's
    operations in both), output and every parameter gradient.
    (float32 matmuls are full precision by default; cuDNN convolutions need TF32 turned off.)
    One RSSS block per encoder stage: an RFAConv at each of the four resolutions and widths. In Triton's CPU
    interpreter each RFAConv backward takes seconds; the default two blocks per stage doubled this test's time.
    Widths 8 to 64: the interpreter's time grows with the channels (one program per 16), and the first stage's 8
    channels also take the kernels' masked channel tiles. (A 32 x 32 input, or one image, leaves BatchNorm too few
    positions at the last stage: the errors then exceed the bounds below.)"""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    if triton_interpreted():
        # The tests above run the kernels' own tiles; this one tests the network's wiring. The interpreter's time
        # grows with the number of programs: 8 positions per tile instead of the GPU's 2 took it from 55 to 20 s.
        for name in ("weighted", "backward_input"):
            monkeypatch.setitem(rfaconv_kernels.CONFIGS, name, (8, 16, 1, 1))
    others = KernelPolicy(scan="torch", rfaconv="torch", layernorm="torch", cross_scan="torch")
    networks = []
    for kernels in (replace(others, rfaconv="triton"), others):
        torch.manual_seed(0)
        networks.append(SAUMamba(3, 2, dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), drop_path_rate=0.0,
                                 kernels=kernels).to(DEVICE))
    fast, unfused = networks
    x = torch.randn(2, 3, 64, 64, device=DEVICE)
    y_fast = fast(x)
    y_fast.square().mean().backward()
    y_ref = unfused(x)
    y_ref.square().mean().backward()
    assert _max_rel(y_fast, y_ref) < 1e-4
    checked = 0
    for (name, p_fast), (_, p_ref) in zip(fast.named_parameters(), unfused.named_parameters(), strict=True):
        if p_ref.grad is not None and p_ref.grad.abs().max() > 0 and "out_conv.bias" not in name:
            assert _max_rel(p_fast.grad, p_ref.grad) < 1e-3, name
            checked += 1
    assert checked > 100


def test_half_precision_module_gets_half_gradients():
    """A module converted with .half() (no autocast): outputs close to float32, gradients in the params' dtype."""
    fast, _ = _pair(16)
    half = copy.deepcopy(fast).half()
    x = torch.randn(2, 5, 6, 16, device=DEVICE)
    grad = torch.randn_like(x)
    y32, gx32, _ = _run(fast, x, grad, channels_last=True)
    y16, gx16, grads16 = _run(half, x.half(), grad.half(), channels_last=True)
    assert y16.dtype == gx16.dtype == torch.float16
    assert all(g.dtype == torch.float16 and torch.isfinite(g).all() for g in grads16.values())
    assert _max_rel(y16.float(), y32) < 1e-2
    assert _max_rel(gx16.float(), gx32) < 2e-2


def test_single_value_per_channel_is_refused_before_statistics_change():
    fast, _ = _pair(8)
    before = {k: v.clone() for k, v in fast.feature_norm.state_dict().items()}
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fast(torch.randn(1, 1, 1, 8, device=DEVICE), channels_last=True)
    for key, value in fast.feature_norm.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_eval_output_survives_a_training_step_before_its_backward():
    """With one channel the running mean's (9, 1) view is already contiguous: the saved copy must not alias it."""
    fast, _ = _pair(1)
    x = torch.randn(2, 4, 4, 1, device=DEVICE, requires_grad=True)
    fast.eval()
    y_eval = fast(x, channels_last=True)
    fast.train()
    fast(x, channels_last=True)  # updates the running statistics in place
    y_eval.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_fallbacks_to_pytorch_operations():
    fast, _ = _pair(8)
    x = torch.randn(2, 4, 4, 8, device=DEVICE)
    assert rfaconv_fused.use_fused(x, "triton", fast)
    assert not rfaconv_fused.use_fused(x.double(), "triton", fast)  # the kernels accumulate in float32
    torch.use_deterministic_algorithms(True)
    try:
        assert not rfaconv_fused.use_fused(x, "triton", fast)  # the kernels reduce with atomic adds
    finally:
        torch.use_deterministic_algorithms(False)
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(fast))
    assert not rfaconv_fused.use_fused(x, "triton", synced)  # multi-GPU statistics stay synchronised
    assert rfaconv_fused.use_fused(x, "triton", synced.eval())


def test_backend_choice(monkeypatch):
    x = torch.zeros(1, 4, 4, 8, device=DEVICE)
    assert not rfaconv_fused.use_fused(x, "torch")
    assert rfaconv_fused.use_fused(x, "auto") == (DEVICE.type == "cuda")
    monkeypatch.setenv("SAUMAMBA_FUSED_KERNELS", "fastest")
    with pytest.raises(ValueError, match="SAUMAMBA_FUSED_KERNELS"):
        RFAConv(8)  # the module reads its policy at construction
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cpu_x = x.cpu()
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        rfaconv_fused.use_fused(cpu_x, "triton")


def test_matrix_product_features_match_multiply_adds():
    """The kernels that compute f as matrix products under autocast ("tf32", DOT_CONFIGS' tiles) against the
    multiply-add form ("ieee", CONFIGS' tiles), on the same inputs. Triton's CPU interpreter multiplies in float32
    either way, so the two must agree to rounding there; on the GPU TF32 rounds f to ~1e-3."""
    from nnunetv2_sa_umamba.ops.rfaconv import kernels
    torch.manual_seed(0)
    x = torch.randn(2, 7, 9, 20, device=DEVICE)
    wf = torch.randn(9, 9, 20, device=DEVICE) * 0.3
    wc, shift = torch.randn(9, 20, device=DEVICE), torch.randn(9, 20, device=DEVICE) * 0.1
    scale = torch.rand(9, 20, device=DEVICE) + 0.5
    grad_weighted = torch.randn(2 * 7 * 9, 9 * 20, device=DEVICE)
    tolerance = 1e-5 if DEVICE.type == "cpu" else 2e-2
    for name, run in (("stats", lambda p: kernels.feature_statistics(x, wf, p)),
                      ("backward_reduce",
                       lambda p: kernels.backward_reduce(x, wf, wc, scale, shift, grad_weighted, p))):
        assert name in kernels.DOT_CONFIGS
        for by_dot, multiply_adds in zip(run("tf32"), run("ieee"), strict=True):
            assert _norm_rel(by_dot, multiply_adds) < tolerance, name


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_full_size_on_cuda(dtype, monkeypatch):
    """Stage-1 size of the 28 x 256 x 256 batch: the fused chain and the released code's operations, each
    against a float64 run of the released operations; the fused chain must be at least as close (within 2x)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    fast, reference = _pair(96)
    exact = copy.deepcopy(reference).double()
    x = torch.randn(28, 64, 64, 96, device="cuda")
    grad = torch.randn_like(x)
    autocast = torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32)
    with autocast:
        fused_result = _run(fast, x, grad, channels_last=True)
    with autocast:
        reference_result = _run(reference, x, grad, channels_last=True)
    exact_result = _run(exact, x.double(), grad.double(), channels_last=True)

    def errors(result):
        # relative to the norm: a ReLU whose input is within rounding of 0 flips for a few of the 11 M values,
        # which decides a max-norm error by chance but hardly moves this one
        y, gx, grads = result
        out = {"output": _norm_rel(y.double(), exact_result[0]), "input grad": _norm_rel(gx.double(), exact_result[1])}
        out.update({name: _norm_rel(g.double(), exact_result[2][name]) for name, g in grads.items()
                    if "out_conv.bias" not in name})
        return out

    fused_errors, reference_errors = errors(fused_result), errors(reference_result)
    for name, label in ((fused_errors, "fused"), (reference_errors, "released ops")):
        print(f"\n{dtype} {label} vs float64: " + ", ".join(f"{k} {v:.1e}" for k, v in name.items()))
    floor = 1e-5 if dtype == torch.float32 else 1e-3
    for key, value in fused_errors.items():
        assert value <= max(2 * reference_errors[key], floor), (key, value, reference_errors[key])
