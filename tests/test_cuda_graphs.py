import copy
import pickle

import pytest
import torch
from torch import nn

from nnunetv2_sa_umamba.architectures.sa_umamba import SAUMamba
from nnunetv2_sa_umamba.training.cuda_graphs import (
    MAX_INFERENCE_GRAPHS,
    disable_inference_graphs,
    disable_training_graphs,
    enable_inference_graphs,
    enable_training_graphs,
    graphs_enabled,
    graphs_recorded,
)

SMALL = dict(dims=(24, 48, 96, 192))


def test_off_cuda_the_network_runs_its_ordinary_forward():
    torch.manual_seed(0)
    plain = SAUMamba(3, 2, drop_path_rate=0.0, **SMALL)
    graphed = SAUMamba(3, 2, drop_path_rate=0.0, **SMALL)
    graphed.load_state_dict(plain.state_dict())
    assert enable_training_graphs(graphed) is graphed and graphs_enabled(graphed)
    assert enable_inference_graphs(graphed) is graphed and graphs_enabled(graphed, "inference")
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(graphed(x), plain(x))
    with torch.no_grad():
        torch.testing.assert_close(graphed.eval()(x), plain.eval()(x))
    assert not graphs_recorded(graphed) and not graphs_recorded(graphed, "inference")
    # the state dict (what checkpoints hold) is untouched
    assert list(graphed.state_dict()) == list(plain.state_dict())


def test_enabling_twice_keeps_one_wrapper_and_hooks_are_refused():
    network = SAUMamba(3, 2, **SMALL)
    enable_training_graphs(network)
    wrapper = network.forward
    enable_training_graphs(network)
    assert network.forward is wrapper
    hooked = SAUMamba(3, 2, **SMALL)
    hooked.register_forward_hook(lambda *args: None)
    with pytest.raises(ValueError, match="hooks"):
        enable_training_graphs(hooked)


def test_copies_get_their_own_unrecorded_wrapper_and_disabling_restores_the_forward():
    network = enable_training_graphs(SAUMamba(3, 2, **SMALL))
    for duplicate in (copy.deepcopy(network), pickle.loads(pickle.dumps(network))):
        # graphs belong to the original's tensors: a copy must record its own
        assert graphs_enabled(duplicate) and not graphs_recorded(duplicate)
        assert not graphs_enabled(duplicate, "inference")
        assert duplicate.forward.network is duplicate
        x = torch.randn(1, 3, 64, 64)
        torch.testing.assert_close(duplicate.eval()(x), network.eval()(x))
    enable_inference_graphs(network)
    disable_training_graphs(network)
    # the inference graphs stay until they are disabled too
    assert not graphs_enabled(network) and graphs_enabled(network, "inference")
    disable_inference_graphs(network)
    assert not graphs_enabled(network, "inference") and "forward" not in network.__dict__
    disable_training_graphs(network)  # a no-op the second time
    with pytest.raises(ValueError, match="kind"):
        graphs_enabled(network, "eval")


def _autocast(dtype, **kwargs):
    """CUDA autocast to ``dtype``, or off for None."""
    return torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None, **kwargs)


def _train_steps(network, inputs, autocast_dtype):
    """Outputs and gradients of AdamW steps on ``inputs``, one batch per step."""
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3)
    outputs, grads = [], []
    for x in inputs:
        optimizer.zero_grad(set_to_none=True)
        with _autocast(autocast_dtype):
            out = network(x)
            loss = sum((o.float() ** 2).mean() for o in out)
        loss.backward()
        optimizer.step()
        # a copy: a replayed graph writes every step's outputs into the same tensors
        outputs.append(out[0].detach().float().clone())
        grads.append(torch.cat([p.grad.flatten().float() for p in network.parameters()]))
    return outputs, grads


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.cuda
@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_graphed_training_matches_eager_training(autocast_dtype, monkeypatch):
    """Four AdamW steps on different batches: the replayed graphs give the eager outputs, gradients, weights and
    batch-norm statistics. Two eager runs already differ (atomic adds in the fused kernels and the scan sum in
    any order), so the graphs are compared with that spread. In float32 (TF32 off) it stays tiny and every step
    is checked; under bf16/fp16 autocast rounding amplifies it (two eager runs' gradients differ by ~20% after one
    step), so only the first step's outputs and the weights after four steps are meaningful there. A stale or
    misplaced tensor gives errors of order 1. Eval mode and other shapes run the ordinary forward."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(0)
    device = torch.device("cuda")
    networks = [SAUMamba(3, 2, deep_supervision=True, drop_path_rate=0.0, **SMALL).to(device) for _ in range(3)]
    eager, eager_again, graphed = networks
    for network in (eager_again, graphed):
        network.load_state_dict(eager.state_dict())
    enable_training_graphs(graphed)
    inputs = [torch.randn(4, 3, 96, 128, device=device) for _ in range(4)]

    expected = _train_steps(eager, inputs, autocast_dtype)
    repeated = _train_steps(eager_again, inputs, autocast_dtype)
    replayed = _train_steps(graphed, inputs, autocast_dtype)
    assert graphs_recorded(graphed)
    checked_steps = 4 if autocast_dtype is None else 1
    for kind, exp, rep, gra in zip(("output", "gradient"), expected, repeated, replayed, strict=True):
        for step, (e, r, g) in enumerate(zip(exp, rep, gra, strict=True)):
            noise, error = _relative_error(r, e), _relative_error(g, e)
            print(f"[{autocast_dtype}] step {step} {kind}: eager vs eager {noise:.1e}, graphs vs eager {error:.1e}")
            if step < checked_steps and (kind == "output" or autocast_dtype is None):
                assert error < max(10 * noise, 1e-4), (step, kind)
    # weights and batch-norm running statistics (the recording's warm-up passes must not have moved them)
    states = [torch.cat([v.flatten().float() for v in n.state_dict().values()]) for n in networks]
    noise, error = _relative_error(states[1], states[0]), _relative_error(states[2], states[0])
    print(f"[{autocast_dtype}] state dict after 4 steps: eager vs eager {noise:.1e}, graphs vs eager {error:.1e}")
    assert error < max(10 * noise, 1e-5)

    autocast = _autocast(autocast_dtype)
    with autocast:
        assert graphed(torch.randn(2, 3, 64, 64, device=device))[0].shape == (2, 2, 64, 64)
        graphed.eval()
        with torch.no_grad():
            # eval mode: the ordinary forward on the same weights
            torch.testing.assert_close(graphed(inputs[0])[0], type(graphed).forward(graphed, inputs[0])[0])


@pytest.mark.cuda
def test_gradients_accumulated_over_steps_match_eager(monkeypatch):
    """Without zeroing between steps the replay's static gradient buffers would be counted twice (PyTorch issue
    181723): such steps run the ordinary forward, and the sums match eager ones. Compared per parameter as a
    relative norm: atomic adds make single small elements differ between any two runs (an element-wise check
    failed now and then), while a gradient counted twice is off by a third or more. Gradients that are zero in exact
    arithmetic (RFAConv's out_conv bias, which a normalisation follows) hold only rounding noise of ~1e-8 per element,
    which differs between runs: each parameter may also be off by 1e-4 of the whole gradient's norm."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(0)
    eager = SAUMamba(3, 2, drop_path_rate=0.0, **SMALL).cuda()
    graphed = SAUMamba(3, 2, drop_path_rate=0.0, **SMALL).cuda()
    graphed.load_state_dict(eager.state_dict())
    enable_training_graphs(graphed)
    inputs = [torch.randn(2, 3, 64, 64, device="cuda") for _ in range(3)]
    for network in (eager, graphed):
        for x in inputs:  # one backward per batch, gradients summed, never zeroed
            (network(x).float() ** 2).mean().backward()
    assert graphs_recorded(graphed)
    grads = [(name, a.grad, b.grad) for (name, a), b in zip(graphed.named_parameters(), eager.parameters(),
                                                            strict=True)]
    whole_norm = torch.cat([b.flatten() for _, _, b in grads if b is not None]).norm()
    for name, a, b in grads:
        if b is None:  # a parameter the forward does not use
            assert a is None or a.norm() == 0, name
            continue
        error, size = (a - b).norm(), b.norm()
        assert error <= 1e-3 * size + 1e-4 * whole_norm, f"{name}: |graphed - eager| {error:.2e}, |eager| {size:.2e}"


@pytest.mark.cuda
def test_graphs_record_once_and_replay_with_drop_path():
    """With drop path on, every replay draws new random numbers (the generator advances), so two steps on the
    same batch differ, as in eager training."""
    torch.manual_seed(0)
    network = enable_training_graphs(SAUMamba(3, 2, drop_path_rate=0.5, **SMALL).cuda())
    x = torch.randn(2, 3, 64, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        first = network(x).detach().clone()
        wrapper_state = network.forward.training_forward
        second = network(x).detach().clone()
    assert network.forward.training_forward is wrapper_state
    assert not torch.equal(first, second)


class _BackwardAutocastProbe(torch.autograd.Function):
    """Identity that notes whether autocast is on when its backward runs."""
    seen: list[bool] = []

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        _BackwardAutocastProbe.seen.append(torch.is_autocast_enabled("cuda"))
        return grad


class _ProbedLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x):
        return _BackwardAutocastProbe.apply(self.linear(x))


@pytest.mark.cuda
def test_backward_is_recorded_outside_autocast_as_eager_training_runs_it():
    """The forward runs under the caller's autocast, the backward without it, as in eager training where
    backward() is called after the autocast block (under autocast the backward's ops cast again: slower, and not
    what eager computes)."""
    x = torch.randn(4, 8, device="cuda")
    probe = _BackwardAutocastProbe.seen
    # the probe sees autocast in a backward run inside the autocast block, so it can tell
    with torch.autocast("cuda", dtype=torch.float16):
        _ProbedLinear().cuda()(x).float().sum().backward()
    assert probe == [True]

    probe.clear()
    network = enable_training_graphs(_ProbedLinear().cuda())
    for _ in range(2):
        network.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16):
            out = network(x)
            assert out.dtype == torch.float16
        out.float().sum().backward()
    assert graphs_recorded(network)
    # warm-up passes and the recording ran the backward in Python; replays do not
    assert probe and not any(probe)


@pytest.mark.cuda
@pytest.mark.parametrize("autocast_dtype", [None, torch.float16], ids=["fp32", "fp16"])
def test_inference_graphs_match_the_ordinary_forward(autocast_dtype):
    """Eval-mode calls without gradients replay one graph per input shape and return the ordinary forward's values
    in tensors of their own; weights changed in place (another fold's checkpoint) are read by the replay."""
    torch.manual_seed(0)
    network = SAUMamba(3, 2, deep_supervision=True, **SMALL).cuda().eval()
    enable_inference_graphs(network)
    inputs = [torch.randn(2, 3, 64, 96, device="cuda") for _ in range(3)]
    autocast = _autocast(autocast_dtype)

    def eager(x):
        # without autocast's weight cache, which older torch keeps under inference mode across the weight change
        with _autocast(autocast_dtype, cache_enabled=False):
            return type(network).forward(network, x)

    with torch.inference_mode(), autocast:
        outputs = [network(x) for x in inputs]
        assert graphs_recorded(network, "inference") == 1
        for x, output in zip(inputs, outputs, strict=True):
            # all heads (deep supervision), and each call's outputs survive the later replays
            for got, expected in zip(output, eager(x), strict=True):
                torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)
        network.load_state_dict({k: v * 1.01 if v.is_floating_point() else v for k, v in network.state_dict().items()})
        torch.testing.assert_close(network(inputs[0])[0], eager(inputs[0])[0], rtol=1e-3, atol=1e-3)
        network(torch.randn(1, 3, 64, 64, device="cuda"))  # another shape: a second graph
        assert graphs_recorded(network, "inference") == 2
    with torch.no_grad(), autocast:  # outside inference mode: its own graph (inference tensors are read-only there)
        torch.testing.assert_close(network(inputs[1])[0], eager(inputs[1])[0], rtol=1e-3, atol=1e-3)
    assert graphs_recorded(network, "inference") == 3
    with autocast:
        # with gradients, or in training mode: the ordinary forward
        assert network(inputs[0])[0].requires_grad
    disable_inference_graphs(network)
    assert not graphs_recorded(network, "inference") and "forward" not in network.__dict__


@pytest.mark.cuda
def test_inference_graphs_keep_the_most_recently_used_shapes():
    network = enable_inference_graphs(SAUMamba(3, 2, **SMALL).cuda().eval())
    widths = [32 * (i + 1) for i in range(MAX_INFERENCE_GRAPHS + 2)]
    with torch.no_grad():
        for width in widths[:MAX_INFERENCE_GRAPHS]:
            network(torch.randn(1, 3, 32, width, device="cuda"))
        network(torch.randn(1, 3, 32, widths[0], device="cuda"))  # the oldest, used again
        for width in widths[MAX_INFERENCE_GRAPHS:]:
            network(torch.randn(1, 3, 32, width, device="cuda"))
    assert graphs_recorded(network, "inference") == MAX_INFERENCE_GRAPHS

    def recorded_widths():  # the signature starts with the input shape
        return sorted(key[0][0][-1] for key in network.forward.inference_graphs)
    assert recorded_widths() == sorted([widths[0]] + widths[3:])


@pytest.mark.cuda
def test_a_network_dropped_with_inference_graphs_frees_its_memory_at_once():
    """The wrapper holds its network weakly: no reference cycle keeps the weights and graph pools alive, and
    recordings share one warm-up stream (each new stream would keep a cuBLAS workspace)."""
    def record_and_drop():
        network = enable_inference_graphs(SAUMamba(3, 2, **SMALL).cuda().eval())
        with torch.no_grad():
            network(torch.randn(2, 3, 64, 64, device="cuda"))
        assert graphs_recorded(network, "inference") == 1 and torch.cuda.memory_allocated() > before

    before = torch.cuda.memory_allocated()
    record_and_drop()  # the first recording in this process may create the warm-up stream's workspace
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(2):
        record_and_drop()
        assert torch.cuda.memory_allocated() == before
