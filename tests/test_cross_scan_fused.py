"""SS2D's Triton cross-scan / cross-merge against the PyTorch formulation (values and gradients, exact in float32).

On a CPU machine the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py).
"""
import copy

import pytest
import torch

pytest.importorskip("triton")

from nnunetv2_sa_umamba.modules import ss2d  # noqa: E402
from nnunetv2_sa_umamba.ops.cross_scan import cross_merge, cross_scan  # noqa: E402
from nnunetv2_sa_umamba.ops.policy import KernelPolicy  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# odd sizes, one-pixel rows, and lines longer than one kernel chunk (128)
SHAPES = [(2, 5, 7, 6), (1, 1, 9, 40), (2, 3, 150, 8)]


@pytest.mark.parametrize("shape", SHAPES)
def test_cross_scan_and_its_gradient(shape):
    x = torch.randn(shape, device=DEVICE, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    xs = cross_scan(x, torch.float32, fused=True)
    xs_ref = cross_scan(x_ref, torch.float32, fused=False)
    assert torch.equal(xs, xs_ref)
    grad = torch.randn_like(xs)
    xs.backward(grad)
    xs_ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_cross_merge_and_its_gradient(shape):
    b, h, w, d = shape
    ys = torch.randn(b, 4, d, h * w, device=DEVICE, requires_grad=True)
    ys_ref = ys.detach().clone().requires_grad_()
    y = cross_merge(ys, h, w, fused=True)
    y_ref = cross_merge(ys_ref, h, w, fused=False)
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    assert torch.equal(ys.grad, ys_ref.grad)


def test_ss2d_with_fused_cross_scan_matches_unfused():
    """Only the cross-scan and cross-merge switched: the output gate's LayerNorm is PyTorch's in both."""
    torch.manual_seed(0)
    module = ss2d.SS2D(16, kernels=KernelPolicy(scan="torch", layernorm="torch", cross_scan="triton")).to(DEVICE)
    unfused = copy.deepcopy(module)
    unfused.kernels = KernelPolicy(scan="torch", layernorm="torch", cross_scan="torch")
    x = torch.randn(2, 6, 10, 16, device=DEVICE)
    results = []
    for m in (module, unfused):
        xi = x.clone().requires_grad_()
        y = m(xi)
        y.square().sum().backward()
        results.append((y, xi.grad, [p.grad for p in m.parameters()]))
    (y, gx, grads), (y_ref, gx_ref, grads_ref) = results
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
def test_ss2d_fused_cross_scan_under_bf16_autocast():
    """Stage-1 shape of the 28 x 256 x 256 batch under bf16 autocast: same result as the PyTorch copies (only the
    cross-scan and cross-merge switched)."""
    torch.manual_seed(0)
    module = ss2d.SS2D(96, kernels=KernelPolicy()).cuda()
    x = torch.randn(28, 64, 64, 96, device="cuda")
    outputs = []
    for choice in ("triton", "torch"):
        module.kernels = KernelPolicy(cross_scan=choice)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            outputs.append(module(x).float())
    error = ((outputs[0] - outputs[1]).abs().max() / outputs[1].abs().max()).item()
    print(f"\nSS2D bf16, fused vs unfused cross-scan/merge: max relative difference {error:.1e}")
    assert error < 1e-2
