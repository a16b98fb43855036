"""ops/recompute.py: a saved tensor rebuilt in the backward instead of kept; SS2D's cross-scan copy rebuilt."""
import gc
import weakref
from contextlib import nullcontext

import pytest
import torch

from nnunetv2_sa_umamba.modules import ss2d as ss2d_module
from nnunetv2_sa_umamba.modules.ss2d import SS2D
from nnunetv2_sa_umamba.ops.policy import KernelPolicy
from nnunetv2_sa_umamba.ops.recompute import rebuilt_in_backward


def _toy_step(x: torch.Tensor, w: torch.Tensor, rebuild: bool):
    """A big copy of x that two ops save (one through a view), with or without the rebuild; returns (loss, a weak
    reference to the copy, how often it was built)."""
    builds = []

    def big_copy():
        builds.append(1)
        return x.repeat(4, 1)

    big = big_copy()
    ref = weakref.ref(big)
    with rebuilt_in_backward(big, big_copy) if rebuild else nullcontext():
        loss = (big @ w).square().sum() + (big[2:].sin() * 3).sum()
    del big
    gc.collect()
    return loss, ref, builds


@pytest.mark.parametrize("rebuild", [False, True])
def test_the_copy_is_kept_only_without_the_rebuild(rebuild):
    x = torch.randn(6, 5, requires_grad=True)
    w = torch.randn(5, 3, requires_grad=True)
    loss, ref, builds = _toy_step(x, w, rebuild)
    assert (ref() is None) == rebuild
    loss.backward()
    # rebuilt once for both ops that saved it, not once per op
    assert len(builds) == (2 if rebuild else 1)


def test_gradients_equal_with_and_without_the_rebuild():
    torch.manual_seed(0)
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    grads = []
    for rebuild in (False, True):
        loss, _, _ = _toy_step(x, w, rebuild)
        grads.append(torch.autograd.grad(loss, (x, w)))
    for kept, rebuilt in zip(*grads, strict=True):
        assert torch.equal(kept, rebuilt)


def test_a_second_backward_rebuilds_again():
    x = torch.randn(6, 5, requires_grad=True)
    w = torch.randn(5, 3, requires_grad=True)
    loss, _, builds = _toy_step(x, w, rebuild=True)
    first = torch.autograd.grad(loss, x, retain_graph=True)[0]
    second = torch.autograd.grad(loss, x)[0]
    assert torch.equal(first, second)
    # the first backward's rebuild is freed after it: the second one rebuilds
    assert len(builds) >= 3


def test_a_rebuild_that_differs_is_a_clear_error():
    x = torch.randn(6, 5, requires_grad=True)
    big = x.repeat(4, 1)
    with rebuilt_in_backward(big, lambda: x.repeat(2, 1)):
        loss = big.sin().sum()
    with pytest.raises(RuntimeError, match=r"rebuilt tensor is \(12, 5\).*forward's was \(24, 5\)"):
        loss.backward()


def test_the_rebuild_runs_under_the_forwards_autocast():
    torch.manual_seed(0)
    x = torch.randn(6, 5, requires_grad=True)
    w = torch.randn(5, 4, requires_grad=True)
    grads = []
    for rebuild in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            product = x @ w  # bfloat16 only under autocast
            with rebuilt_in_backward(product, lambda: x @ w) if rebuild else nullcontext():
                loss = (product * product).float().sum()
        grads.append(torch.autograd.grad(loss, (x, w)))
    for kept, rebuilt in zip(*grads, strict=True):
        assert torch.equal(kept, rebuilt)


def test_a_double_backward_is_refused_clearly():
    x = torch.randn(6, 5, requires_grad=True)
    w = torch.randn(5, 3, requires_grad=True)
    loss, _, _ = _toy_step(x, w, rebuild=True)
    with pytest.raises(RuntimeError, match="create_graph=True"):
        torch.autograd.grad(loss, x, create_graph=True)


def test_nothing_is_hooked_without_grad():
    x = torch.randn(6, 5)
    with rebuilt_in_backward(x, lambda: pytest.fail("rebuilt without a backward")):
        assert (x * 2).grad_fn is None


def _track_outputs(monkeypatch, name: str) -> list:
    """Weak references to every output of ss2d.py's ``name``."""
    made = []
    original = getattr(ss2d_module, name)

    def tracked(*args, **kwargs):
        out = original(*args, **kwargs)
        made.append(weakref.ref(out))
        return out

    monkeypatch.setattr(ss2d_module, name, tracked)
    return made


@pytest.mark.parametrize("tracked", ["cross_scan", "layer_norm_gate"])
def test_ss2d_keeps_neither_copy_and_its_gradients_are_unchanged(monkeypatch, tracked):
    """Neither the cross-scan copy nor the gated output outlives the forward; the backward rebuilds each once and
    gets the same gradients as with both kept."""
    torch.manual_seed(0)
    module = SS2D(8, d_state=4, kernels=KernelPolicy(cross_scan="torch", layernorm="torch"))
    x = torch.randn(2, 5, 6, 8, requires_grad=True)
    made = _track_outputs(monkeypatch, tracked)
    results = []
    for rebuild in (True, False):
        if not rebuild:
            monkeypatch.setattr(ss2d_module, "rebuilt_in_backward", lambda *args: nullcontext())
        made.clear()
        out = module(x)
        gc.collect()
        assert (made[0]() is None) == rebuild
        grads = torch.autograd.grad(out.square().sum(), [x, *module.parameters()])
        assert len(made) == (2 if rebuild else 1)
        results.append((out, grads))
    (out_rebuilt, grads_rebuilt), (out_kept, grads_kept) = results
    assert torch.equal(out_rebuilt, out_kept)
    for rebuilt, kept in zip(grads_rebuilt, grads_kept, strict=True):
        assert torch.equal(rebuilt, kept)
