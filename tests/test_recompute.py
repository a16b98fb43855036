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


def _kept(t: torch.Tensor) -> weakref.ref:
    """A weak reference to ``t``'s memory: alive while any tensor on it (a view autograd saved too) is."""
    return weakref.ref(t.untyped_storage())


def _toy_step(x: torch.Tensor, w: torch.Tensor, rebuild: bool):
    """A big copy of x that two ops save (one through a view), with or without the rebuild; returns (loss, a weak
    reference to the copy's memory, how often it was built)."""
    builds = []

    def big_copy():
        big = x.repeat(4, 1)
        builds.append(_kept(big))
        return big

    big = big_copy()
    ref = _kept(big)
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


def _assert_same_gradients(loss_of, inputs):
    """``loss_of(rebuild)``'s gradients with respect to ``inputs`` are equal with and without the rebuild."""
    grads = [torch.autograd.grad(loss_of(rebuild), inputs) for rebuild in (False, True)]
    for kept, rebuilt in zip(*grads, strict=True):
        assert torch.equal(kept, rebuilt)


def test_gradients_equal_with_and_without_the_rebuild():
    torch.manual_seed(0)
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    _assert_same_gradients(lambda rebuild: _toy_step(x, w, rebuild)[0], (x, w))


def test_a_second_backward_rebuilds_again():
    x = torch.randn(6, 5, requires_grad=True)
    w = torch.randn(5, 3, requires_grad=True)
    loss, _, builds = _toy_step(x, w, rebuild=True)
    first = torch.autograd.grad(loss, x, retain_graph=True)[0]
    second = torch.autograd.grad(loss, x, retain_graph=True)[0]
    assert torch.equal(first, second)
    # the first backward's rebuild is freed after it: the second one rebuilds, once for both ops again, and frees
    # it too while the graph is still there
    assert len(builds) == 3
    gc.collect()
    assert all(kept() is None for kept in builds)


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

    def loss_of(rebuild: bool) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            product = x @ w  # bfloat16 only under autocast
            with rebuilt_in_backward(product, lambda: x @ w) if rebuild else nullcontext():
                return (product * product).float().sum()

    _assert_same_gradients(loss_of, (x, w))


def test_a_double_backward_is_refused_clearly():
    x = torch.randn(6, 5, requires_grad=True)
    w = torch.randn(5, 3, requires_grad=True)
    loss, _, _ = _toy_step(x, w, rebuild=True)
    with pytest.raises(RuntimeError, match="create_graph=True"):
        torch.autograd.grad(loss, x, create_graph=True)


def test_a_tensor_changed_in_place_after_the_forward_is_refused_as_autograd_refuses_it():
    x = torch.randn(6, 5, requires_grad=True)
    w = torch.randn(5, 3, requires_grad=True)
    with torch.no_grad():
        loss, _, _ = _toy_step(x, w, rebuild=True)
    loss, _, _ = _toy_step(x, w, rebuild=True)
    with torch.no_grad():
        w.mul_(2)  # saved by the matmul, passed through by the hooks
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()

    big = x.repeat(4, 1)
    with rebuilt_in_backward(big, lambda: x.repeat(4, 1)):
        loss = big.sin().sum()
    with torch.no_grad():
        big.add_(1)  # the rebuilt values would no longer be what the forward used
    with pytest.raises(RuntimeError, match="rebuilds.*modified by an inplace operation"):
        loss.backward()


def _saved_under(rebuild_target: torch.Tensor, run) -> list:
    """What an outer saved-tensor hook is given while ``run`` runs inside rebuilt_in_backward(rebuild_target)."""
    seen = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t) or t, lambda t: t):
        with rebuilt_in_backward(rebuild_target, lambda: pytest.fail("rebuilt under outer hooks")):
            run()
    return seen


def test_outer_hooks_such_as_a_users_checkpoint_are_left_in_charge():
    x = torch.randn(6, 5, requires_grad=True)
    big = x.repeat(4, 1)
    seen = _saved_under(big, lambda: big.sin().sum().backward())
    assert any(t is big for t in seen)


@pytest.mark.parametrize("part", ["slice", "transposed"])
def test_a_tensor_that_is_not_its_whole_storage_is_kept(part):
    x = torch.randn(6, 5, requires_grad=True)
    buffer = x.repeat(4, 1)
    big = buffer[6:] if part == "slice" else buffer.t()
    builds = []
    with rebuilt_in_backward(big, lambda: builds.append(1) or big.clone()):
        loss = (big.sin() * buffer[:6].sum()).sum()
    loss.backward()
    assert not builds


def test_nothing_is_hooked_without_grad():
    x = torch.randn(6, 5)
    with rebuilt_in_backward(x, lambda: pytest.fail("rebuilt without a backward")):
        assert (x * 2).grad_fn is None


def _track_outputs(monkeypatch, name: str) -> list:
    """Weak references to the memory of every output of ss2d.py's ``name``."""
    made = []
    original = getattr(ss2d_module, name)

    def tracked(*args, **kwargs):
        out = original(*args, **kwargs)
        made.append(_kept(out))
        return out

    monkeypatch.setattr(ss2d_module, name, tracked)
    return made


@pytest.mark.parametrize("cross_scan, layernorm", [("torch", "torch"), ("torch", "triton"), ("triton", "triton")])
def test_ss2d_keeps_neither_copy_and_its_gradients_are_unchanged(monkeypatch, cross_scan, layernorm):
    """Neither the cross-scan copy nor the gated output outlives the forward; the backward rebuilds each once and
    gets the same gradients as with both kept. (PyTorch's ops or the fused kernels, in Triton's interpreter off
    CUDA.)"""
    torch.manual_seed(0)
    module = SS2D(8, d_state=4, kernels=KernelPolicy(cross_scan=cross_scan, layernorm=layernorm))
    x = torch.randn(2, 5, 6, 8, requires_grad=True)
    made = {name: _track_outputs(monkeypatch, name) for name in ("cross_scan", "layer_norm_gate")}
    results = []
    for rebuild in (True, False):
        if not rebuild:
            monkeypatch.setattr(ss2d_module, "rebuilt_in_backward", lambda *args: nullcontext())
        for outputs in made.values():
            outputs.clear()
        out = module(x)
        gc.collect()
        for outputs in made.values():
            assert (outputs[0]() is None) == rebuild
        grads = torch.autograd.grad(out.square().sum(), [x, *module.parameters()])
        assert [len(outputs) for outputs in made.values()] == [2 if rebuild else 1] * 2
        results.append((out, grads))
    (out_rebuilt, grads_rebuilt), (out_kept, grads_kept) = results
    assert torch.equal(out_rebuilt, out_kept)
    for rebuilt, kept in zip(grads_rebuilt, grads_kept, strict=True):
        assert torch.equal(rebuilt, kept)


@pytest.mark.parametrize("layernorm", ["torch", "triton"])
def test_the_gate_rebuild_keeps_no_second_copy_of_its_input(monkeypatch, layernorm):
    """The merged scan output reaches the gate as a permuted view when the cross-merge is PyTorch's: the gate keeps
    a row-major copy, so the rebuild must read that copy, not keep the view's buffer as well."""
    torch.manual_seed(0)
    module = SS2D(8, d_state=4, kernels=KernelPolicy(cross_scan="torch", layernorm=layernorm))
    merged = _track_outputs(monkeypatch, "cross_merge")
    out = module(torch.randn(2, 5, 6, 8, requires_grad=True))
    gc.collect()
    assert merged[0]() is None
    out.sum().backward()
