"""The kernel policy: resolution order, validation at construction, one operator switched alone, and no
environment read inside forward."""
from dataclasses import replace

import pytest
import torch

from nnunetv2_sa_umamba.architectures.sa_umamba import SAUMamba
from nnunetv2_sa_umamba.modules.blocks import LayerNorm
from nnunetv2_sa_umamba.modules.rfaconv import RFAConv
from nnunetv2_sa_umamba.modules.ss2d import SS2D
from nnunetv2_sa_umamba.ops import cross_scan, layernorm, rfaconv
from nnunetv2_sa_umamba.ops.policy import FUSED_ENV_VAR, SCAN_ENV_VAR, KernelPolicy, kernel_policy

SMALL = dict(dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), decoder_depths=(1, 1, 1, 1), drop_path_rate=0.0)


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv(SCAN_ENV_VAR, raising=False)
    monkeypatch.delenv(FUSED_ENV_VAR, raising=False)
    return monkeypatch


def test_defaults_without_environment(clean_env):
    assert kernel_policy() == KernelPolicy() == KernelPolicy("fast", "auto", "auto", "auto", "auto", "auto", "auto")


def test_arguments_win_over_environment_over_defaults(clean_env):
    clean_env.setenv(SCAN_ENV_VAR, " Torch ")
    clean_env.setenv(FUSED_ENV_VAR, "triton")
    from_env = kernel_policy()
    assert (from_env.scan, from_env.rfaconv, from_env.layernorm, from_env.cross_scan, from_env.scan_forward,
            from_env.scan_backward) == ("torch",) + ("triton",) * 5
    assert from_env.implementation == "fast"
    explicit = kernel_policy("reference", scan="cuda", fused="torch")
    assert explicit == KernelPolicy("reference", "cuda", "torch", "torch", "torch", "torch", "torch")
    # a per-operator argument overrides the fused choice (given or from the environment) for that operator only
    assert kernel_policy(layernorm="torch") == KernelPolicy(scan="torch", rfaconv="triton", layernorm="torch",
                                                            cross_scan="triton", scan_forward="triton",
                                                            scan_backward="triton")
    assert kernel_policy(scan_forward="torch").scan_forward == "torch"
    assert kernel_policy(scan_backward="torch") == replace(kernel_policy(), scan_backward="torch")
    assert kernel_policy(fused="auto", cross_scan="triton").cross_scan == "triton"
    # an explicit mapping instead of os.environ
    assert kernel_policy(environ={FUSED_ENV_VAR: "torch"}) == KernelPolicy(rfaconv="torch", layernorm="torch",
                                                                           cross_scan="torch", scan_forward="torch",
                                                                           scan_backward="torch")


@pytest.mark.parametrize("name, value, allowed", [
    (SCAN_ENV_VAR, "mamba", "auto, cuda, triton, torch"),
    (SCAN_ENV_VAR, "reference", "auto, cuda, triton, torch"),  # the sequential loop is for tests, not a setting
    (FUSED_ENV_VAR, "fastest", "auto, triton, torch"),
])
def test_bad_environment_value_fails_when_the_network_is_built(clean_env, name, value, allowed):
    clean_env.setenv(name, value)
    message = f"environment variable {name}='{value}' is not one of {allowed}"
    with pytest.raises(ValueError, match=message):
        SAUMamba(3, 2, **SMALL)  # construction, before any forward
    for module in (lambda: SS2D(8), lambda: RFAConv(8), lambda: LayerNorm(8)):
        with pytest.raises(ValueError, match=message):
            module()
    # explicit arguments do not consult the variable they replace
    kernels = kernel_policy(scan="torch") if name == SCAN_ENV_VAR else kernel_policy(fused="torch")
    SAUMamba(3, 2, kernels=kernels, **SMALL)


@pytest.mark.parametrize("kwargs, field", [
    (dict(implementation="turbo"), "implementation"), (dict(scan="mamba"), "scan"),
    (dict(rfaconv="cuda"), "rfaconv"), (dict(layernorm="fast"), "layernorm"), (dict(cross_scan=""), "cross_scan"),
    (dict(scan_forward="cuda"), "scan_forward"), (dict(scan_backward="mamba"), "scan_backward"),
])
def test_bad_argument_names_the_field_and_its_choices(kwargs, field):
    with pytest.raises(ValueError, match=f"kernel policy: {field} must be one of"):
        KernelPolicy(**kwargs)
    with pytest.raises(ValueError, match="kernel policy: fused must be one of auto, triton, torch, got 'cuda'"):
        kernel_policy(fused="cuda")


def test_policy_is_frozen_and_replace_switches_one_operator():
    policy = KernelPolicy(rfaconv="triton", layernorm="triton", cross_scan="triton")
    with pytest.raises(AttributeError):
        policy.rfaconv = "torch"
    switched = replace(policy, rfaconv="torch")
    assert (switched.rfaconv, switched.layernorm, switched.cross_scan) == ("torch", "triton", "triton")


def test_network_passes_one_policy_to_every_module(clean_env):
    kernels = KernelPolicy(scan="torch", rfaconv="torch")
    network = SAUMamba(3, 2, kernels=kernels, **SMALL)
    users = [m for m in network.modules() if isinstance(m, (SS2D, RFAConv, LayerNorm))]
    assert len(users) > 10 and all(m.kernels is kernels for m in users)


def test_switching_one_operator_leaves_the_others(clean_env):
    """RFAConv unfused, the LayerNorms and the cross-scan fused: each operator's kernels follow its own field."""
    pytest.importorskip("triton")
    decisions = {}

    def record(module, name):
        original = getattr(module, name)

        def wrapped(*args, **kwargs):
            decisions.setdefault(module.__name__, []).append(original(*args, **kwargs))
            return decisions[module.__name__][-1]

        clean_env.setattr(module, name, wrapped)

    for module, name in ((rfaconv, "use_fused"), (cross_scan, "use_fused"), (layernorm.interface, "_fused")):
        record(module, name)
    kernels = KernelPolicy(scan="torch", rfaconv="torch", layernorm="triton", cross_scan="triton")
    network = SAUMamba(3, 2, kernels=kernels, **SMALL).eval()
    with torch.no_grad():
        network(torch.randn(1, 3, 32, 32))
    assert decisions[rfaconv.__name__] and not any(decisions[rfaconv.__name__])
    assert decisions[cross_scan.__name__] and all(decisions[cross_scan.__name__])
    assert decisions[layernorm.interface.__name__] and all(decisions[layernorm.interface.__name__])


def test_forward_does_not_read_the_environment(clean_env):
    """Variables changed after construction, even to invalid values, change nothing: the modules use the policy
    they stored."""
    torch.manual_seed(0)
    network = SAUMamba(3, 2, **SMALL).eval()
    assert network.kernels == KernelPolicy()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        before = network(x)
    clean_env.setenv(SCAN_ENV_VAR, "not-a-backend")
    clean_env.setenv(FUSED_ENV_VAR, "not-a-choice")
    with torch.no_grad():
        after = network(x)
    assert torch.equal(before, after)
    assert network.kernels == KernelPolicy()
