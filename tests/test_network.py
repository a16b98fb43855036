"""SA-UMamba network: shapes, parameter counts, ablation switches, fast vs reference implementation."""
from dataclasses import replace

import pytest
import torch

from nnunetv2_sa_umamba.architectures.sa_umamba import SAUMamba
from nnunetv2_sa_umamba.modules.blocks import RSSSBlock, VSSBlock
from nnunetv2_sa_umamba.modules.rfaconv import RFAConv
from nnunetv2_sa_umamba.modules.ss2d import SS2D
from nnunetv2_sa_umamba.ops.policy import KernelPolicy

REFERENCE, FAST = KernelPolicy(implementation="reference"), KernelPolicy()
SMALL = dict(dims=(16, 32, 64, 128), depths=(1, 1, 1, 1), decoder_depths=(1, 1, 1, 1))


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if not name.startswith("deep_supervision_heads"))


@pytest.mark.parametrize("kwargs, expected", [
    (dict(in_channels=3, num_classes=1), 41_859_241),
    (dict(in_channels=3, num_classes=9), 41_859_441),
    (dict(in_channels=3, num_classes=1, rfac=False, residual_scale=False), 27_427_561),
])
def test_parameter_counts_match_the_paper(kwargs, expected):
    assert count_parameters(SAUMamba(**kwargs)) == expected


@pytest.mark.parametrize("in_channels, height, width, classes", [(1, 96, 160, 2), (3, 256, 256, 1), (3, 40, 72, 3)])
def test_output_shapes_for_any_input_size(in_channels, height, width, classes):
    torch.manual_seed(0)
    model = SAUMamba(in_channels, classes).eval()
    with torch.no_grad():
        logits = model(torch.randn(1, in_channels, height, width))
    assert logits.shape == (1, classes, height, width)
    assert torch.isfinite(logits).all()


def test_deep_supervision_outputs_follow_output_scales():
    torch.manual_seed(0)
    model = SAUMamba(3, 4, deep_supervision=True, **SMALL).eval()
    with torch.no_grad():
        outputs = model(torch.randn(2, 3, 64, 128))
    assert len(outputs) == len(SAUMamba.output_scales())
    for output, scale in zip(outputs, SAUMamba.output_scales(), strict=True):
        assert output.shape == (2, 4, int(64 * scale), int(128 * scale))


def test_padded_inputs_give_per_sample_results():
    torch.manual_seed(0)
    model = SAUMamba(3, 2, **SMALL).eval()
    x = torch.randn(2, 3, 50, 70)
    with torch.no_grad():
        both = model(x)
        first = model(x[:1])
    torch.testing.assert_close(both[:1], first, rtol=1e-4, atol=1e-5)


def test_wrong_input_channels_is_a_clear_error():
    model = SAUMamba(1, 2, **SMALL)
    with pytest.raises(ValueError, match=r"expected input \(B, 1, H, W\)"):
        model(torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("shape", [(0, 3, 64, 64), (1, 3, 0, 64), (2, 3, 64, 0)])
def test_empty_input_is_a_clear_error(shape):
    model = SAUMamba(3, 2, **SMALL)
    with pytest.raises(ValueError, match=r"empty input .* at least one image of at least 1 x 1 pixels"):
        model(torch.zeros(shape))


def test_ablation_switches_build_what_they_say():
    vm_unet = SAUMamba(**SMALL, rfac=False, residual_scale=False)
    scale_only = SAUMamba(**SMALL, rfac=False)
    rfac_only = SAUMamba(**SMALL, residual_scale=False)
    full = SAUMamba(**SMALL)
    rsss_decoder = SAUMamba(**SMALL, decoder_block="rsss")

    def modules_of(model, kind):
        return [m for m in model.modules() if isinstance(m, kind)]

    assert not modules_of(vm_unet, RFAConv) and not any("scale" in n for n, _ in vm_unet.named_parameters())
    assert not modules_of(scale_only, RFAConv) and any(n.endswith("scale1") for n, _ in scale_only.named_parameters())
    assert len(modules_of(rfac_only, RFAConv)) == 4 and not any("scale" in n for n, _ in rfac_only.named_parameters())
    assert len(modules_of(full, RFAConv)) == 4
    assert all(isinstance(b, VSSBlock) for s in full.decoder_stages for b in s.blocks)
    assert all(isinstance(b, RSSSBlock) for s in rsss_decoder.decoder_stages for b in s.blocks)
    assert len(modules_of(rsss_decoder, RFAConv)) == 8


def test_rsss_block_without_switches_computes_a_vss_block():
    torch.manual_seed(0)
    vss = VSSBlock(16).eval()
    rsss = RSSSBlock(16, rfac=False, residual_scale=False).eval()
    rsss.load_state_dict(vss.state_dict())
    x = torch.randn(2, 8, 8, 16)
    with torch.no_grad():
        torch.testing.assert_close(rsss(x), vss(x))


def test_residual_scales_scale_the_identity_path():
    torch.manual_seed(0)
    block = RSSSBlock(16).eval()
    x = torch.randn(1, 8, 8, 16)
    with torch.no_grad():
        before = block(x)
        block.scale1.mul_(2.0)
        after = block(x)
    assert not torch.allclose(before, after)


def _assert_same_forward_and_gradients(reference: torch.nn.Module, fast: torch.nn.Module, x: torch.Tensor):
    fast.load_state_dict(reference.state_dict())
    outputs = []
    for model in (reference, fast):
        x_ = x.clone().requires_grad_(True)
        out = model(x_)
        out = torch.cat([o.flatten() for o in out]) if isinstance(out, list) else out
        weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
        (out * weights).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        outputs.append((out.detach(), x_.grad, grads))
    (out_r, dx_r, grads_r), (out_f, dx_f, grads_f) = outputs
    torch.testing.assert_close(out_f, out_r, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dx_f, dx_r, rtol=1e-4, atol=1e-5)
    assert grads_r.keys() == grads_f.keys()
    for name in grads_r:
        # float32 tolerance relative to each gradient tensor's scale (elementwise rtol fails on near-zero entries)
        error = (grads_f[name] - grads_r[name]).abs().max()
        assert error <= 1e-4 * grads_r[name].abs().max() + 1e-10, f"{name}: {error}"


def test_fast_ss2d_matches_reference():
    torch.manual_seed(0)
    _assert_same_forward_and_gradients(SS2D(16, kernels=REFERENCE), SS2D(16, kernels=FAST),
                                       torch.randn(2, 6, 10, 16))


def test_fast_rfaconv_matches_reference():
    # float64: in training mode the pre-BatchNorm bias has an exactly-zero gradient, so float32 compares noise
    torch.manual_seed(0)
    _assert_same_forward_and_gradients(RFAConv(8, kernels=REFERENCE).double(), RFAConv(8, kernels=FAST).double(),
                                       torch.randn(2, 8, 7, 9, dtype=torch.float64))


def test_fast_network_matches_reference_network():
    torch.manual_seed(0)
    reference = SAUMamba(3, 2, deep_supervision=True, drop_path_rate=0.0, kernels=REFERENCE, **SMALL)
    fast = SAUMamba(3, 2, deep_supervision=True, drop_path_rate=0.0, kernels=FAST, **SMALL)
    # BatchNorm on running statistics: see test_fast_rfaconv_matches_reference for training mode
    _assert_same_forward_and_gradients(reference.eval(), fast.eval(), torch.randn(2, 3, 32, 64))


def test_unknown_implementation_is_rejected():
    with pytest.raises(ValueError, match="implementation"):
        SAUMamba(kernels=KernelPolicy(implementation="turbo"))


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _run_on_cuda(model: torch.nn.Module, x: torch.Tensor, autocast_dtype) -> tuple[torch.Tensor, torch.Tensor]:
    model.zero_grad()
    with torch.autocast("cuda", dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        outputs = model(x)
        loss = sum((o.float() ** 2).mean() for o in outputs)
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return outputs[0].detach().float(), grad


@pytest.mark.cuda
@pytest.mark.parametrize("autocast_dtype,scan_backward", [(None, "auto"), (torch.bfloat16, "auto"),
                                                         (torch.float16, "auto"), (None, "triton"),
                                                         (torch.bfloat16, "triton")],
                         ids=["fp32", "bf16", "fp16", "fp32-sequential-backward", "bf16-sequential-backward"])
def test_full_network_forward_backward_on_cuda(autocast_dtype, scan_backward, monkeypatch):
    """Full-size network on the GPU. In float32 the fast path (mamba-ssm kernel) matches the reference path to
    float32 tolerance; under autocast (16-bit scan inputs in the fast path, float32 in the reference) both are
    compared with the float32 result, and the fast path may not be much further from it than the reference.
    TF32 is off: the fast path's fused kernels compute in true float32, cuDNN's convolutions otherwise do not.
    scan_backward "triton" runs every scan's backward through the sequential Triton kernel (at this size "auto" runs
    none: too few steps and channels)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(0)
    device = torch.device("cuda")
    reference = SAUMamba(3, 2, deep_supervision=True, drop_path_rate=0.0, kernels=REFERENCE).to(device)
    fast = SAUMamba(3, 2, deep_supervision=True, drop_path_rate=0.0,
                    kernels=replace(FAST, scan_backward=scan_backward)).to(device)
    fast.load_state_dict(reference.state_dict())
    reference.eval(), fast.eval()
    x = torch.randn(2, 3, 128, 160, device=device)
    exact_out, exact_grad = _run_on_cuda(reference, x, None)
    ref_out, ref_grad = _run_on_cuda(reference, x, autocast_dtype)
    fast_out, fast_grad = _run_on_cuda(fast, x, autocast_dtype)
    assert torch.isfinite(fast_out).all() and torch.isfinite(fast_grad).all()
    errors = {"reference": (_relative_error(ref_out, exact_out), _relative_error(ref_grad, exact_grad)),
              "fast": (_relative_error(fast_out, exact_out), _relative_error(fast_grad, exact_grad))}
    print(f"\n[{autocast_dtype}] relative error vs float32 reference (output, gradient): {errors}")
    if autocast_dtype is None:
        assert max(errors["fast"]) < 1e-4
    else:
        for fast_error, ref_error in zip(errors["fast"], errors["reference"], strict=True):
            assert fast_error < max(2 * ref_error, 1e-2)
