"""Compiling ahead (ops/compile_ahead.py, training/precompile.py) and the launch keys that decide how many variants
there are to compile. The compiles themselves need a GPU; here: the dry step leaves the network as it was, the
dry-run hook's logic, and which sizes the kernels specialise on."""
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch

from nnunetv2_sa_umamba.architectures.sa_umamba import SAUMamba
from nnunetv2_sa_umamba.ops import compile_ahead as compile_ahead_module
from nnunetv2_sa_umamba.ops.compile_ahead import compile_ahead, compile_ahead_supported
from nnunetv2_sa_umamba.ops.layernorm import layer_norm
from nnunetv2_sa_umamba.ops.policy import kernel_policy
from nnunetv2_sa_umamba.training.cuda_graphs import enable_training_graphs, graphs_recorded, ungraphed_forward
from nnunetv2_sa_umamba.training.precompile import dry_training_step, precompile_training_step

triton = pytest.importorskip("triton")
SMALL = dict(dims=(24, 48, 96, 192))


def _small_network() -> SAUMamba:
    torch.manual_seed(0)
    return SAUMamba(3, 2, drop_path_rate=0.3, kernels=kernel_policy("fast", scan="torch", fused="torch"), **SMALL)


def test_dry_step_leaves_the_network_as_it_was():
    network = enable_training_graphs(_small_network())
    network.final_expand.eval()  # a module in another mode than its parent keeps it
    state = {name: value.clone() for name, value in network.state_dict().items()}
    grad = torch.ones_like(network.head.bias)
    network.head.bias.grad = grad
    x = torch.randn(2, 3, 64, 64)
    rng = torch.get_rng_state()
    dry_training_step(network, x, torch.bfloat16)
    assert torch.equal(torch.get_rng_state(), rng)  # drop path drew from it
    after = network.state_dict()
    assert all(torch.equal(after[name], value) for name, value in state.items())  # batch-norm statistics too
    assert network.head.bias.grad is grad and torch.equal(grad, torch.ones_like(grad))
    assert all(p.grad is None for name, p in network.named_parameters() if name != "head.bias")
    assert network.training and not network.final_expand.training
    assert not graphs_recorded(network)


def test_ungraphed_forward_is_the_ordinary_forward():
    network = _small_network().eval()
    plain = network.forward
    enable_training_graphs(network)
    assert ungraphed_forward(network) is not network.forward
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ungraphed_forward(network)(x), plain(x))
    assert ungraphed_forward(_small_network()) is not None


def test_off_cuda_precompile_does_nothing():
    network = _small_network()
    state = {name: value.clone() for name, value in network.state_dict().items()}
    record = precompile_training_step(network, torch.randn(1, 3, 64, 64))
    assert not record.observable and record.compilations == []
    assert all(torch.equal(network.state_dict()[name], value) for name, value in state.items())


def test_under_the_interpreter_launches_run_as_usual():
    assert not compile_ahead_supported()  # the tests run Triton's interpreter
    norm = torch.nn.LayerNorm(8)
    x = torch.randn(4, 8)
    with compile_ahead():
        out = layer_norm(x, norm, kernels="triton")
    torch.testing.assert_close(out, norm(x))


class _Kernel:
    """Stands for a JITFunction: records what it is asked to preload."""

    def __init__(self, fail: bool = False):
        self.preloaded = []
        self.fail = fail

    def preload(self, data):
        if self.fail:
            raise RuntimeError("out of resources")
        self.preloaded.append(data)


def _launch(hook, kernel, key, warmup=False):
    return hook(key=key, repr="", fn=SimpleNamespace(jit_function=kernel), is_manual_warmup=warmup,
                already_compiled=False, compile={"specialization_data": f"{key}-data"})


@pytest.fixture
def dry_run_hook(monkeypatch):
    """compile_ahead() as on a GPU (the hook installed), whatever this machine has."""
    knobs = getattr(triton, "knobs", None)
    if knobs is None or not hasattr(knobs.runtime, "jit_cache_hook"):
        pytest.skip("Triton's jit_cache_hook needs Triton 3.4 or later")
    monkeypatch.setattr(compile_ahead_module, "compile_ahead_supported", lambda: True)
    return knobs


def test_a_launch_not_compiled_yet_is_skipped_and_compiled_once(dry_run_hook):
    kernel, other = _Kernel(), _Kernel()
    previous = dry_run_hook.runtime.jit_cache_hook
    with compile_ahead(max_workers=2):
        hook = dry_run_hook.runtime.jit_cache_hook
        assert _launch(hook, kernel, "a") is True  # skipped: not launched
        assert _launch(hook, kernel, "a") is True  # the same variant again: not compiled twice
        assert _launch(hook, kernel, "b") is True
        assert _launch(hook, other, "a") is True  # another kernel's key
        assert _launch(hook, kernel, "c", warmup=True) is None  # a preload (or an explicit warmup) compiles
    assert dry_run_hook.runtime.jit_cache_hook is previous
    assert sorted(kernel.preloaded) == ["a-data", "b-data"] and other.preloaded == ["a-data"]


def test_a_hook_set_before_still_decides(dry_run_hook, monkeypatch):
    seen = []
    monkeypatch.setattr(dry_run_hook.runtime, "jit_cache_hook", lambda **kwargs: seen.append(kwargs["key"]) or True)
    kernel = _Kernel()
    with compile_ahead():
        assert _launch(dry_run_hook.runtime.jit_cache_hook, kernel, "a") is True
    assert seen == ["a"] and kernel.preloaded == []


def test_a_failed_compile_warns_and_leaves_the_variant_to_its_launch(dry_run_hook):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with compile_ahead():
            _launch(dry_run_hook.runtime.jit_cache_hook, _Kernel(fail=True), "a")
    assert any("1 of 1 Triton kernel variants failed to compile ahead" in str(w.message) for w in caught)


def test_the_dry_step_gets_the_gil_back_quickly_and_the_interval_is_restored(dry_run_hook):
    before = sys.getswitchinterval()
    with pytest.raises(RuntimeError, match="dry step failed"):
        with compile_ahead(max_workers=1):
            assert sys.getswitchinterval() == pytest.approx(compile_ahead_module.DRY_STEP_SWITCH_INTERVAL_S)
            assert sys.getswitchinterval() < before
            raise RuntimeError("dry step failed")
    assert sys.getswitchinterval() == before


# ------------------------------------------------------------ which sizes the kernels specialise on
def _specialization(kernel, *args, **kwargs):
    """What Triton keys a launch's compiled variant on (besides the launch options), for CPU tensors."""
    try:
        from triton.backends.compiler import BaseBackend
        from triton.runtime.jit import JITFunction, create_function_from_signature
    except ImportError:
        pytest.skip("this Triton's launch binder differs")
    if not isinstance(kernel, JITFunction):  # the interpreter's wrapper keeps the decorator's arguments
        kernel = JITFunction(kernel.fn, **{name: value for name, value in kernel.kwargs.items()
                                           if name.startswith("do_not_specialize")})
    binder = create_function_from_signature(kernel.signature, kernel.params, BaseBackend)
    return binder(*args, **kwargs)[1]


def test_rfaconv_kernels_compile_once_for_all_stages_batches_and_image_sizes():
    from nnunetv2_sa_umamba.ops.rfaconv import kernels

    def key(batch, side, channels):
        x = torch.empty(batch * side * side, channels)
        wf, v = torch.empty(9, 9, channels), torch.empty(9, channels)
        return _specialization(kernels._stats_kernel, x, wf, v, v, batch * side * side, side, side, channels,
                               TILES=1, BLOCK_P=16, BLOCK_C=16, BLOCK_K=16, PRECISION="ieee", F_BY_DOT=False)

    # SA-UMamba's four stages at batch 5 of 64 x 64 and batch 27 of 256 x 256
    keys = {str(key(5, side, c)) for side, c in zip((16, 8, 4, 2), (96, 192, 384, 768), strict=True)}
    keys |= {str(key(27, side, c)) for side, c in zip((64, 32, 16, 8), (96, 192, 384, 768), strict=True)}
    assert len(keys) == 1


def test_layernorm_rows_do_not_make_variants():
    from nnunetv2_sa_umamba.ops.layernorm import kernels

    def key(rows):
        x, w = torch.empty(rows, 768), torch.empty(768)
        return str(_specialization(kernels._forward_kernel, x, x, w, w, x, w, w, rows, 768, 768, 768, 1e-5,
                                   GATE=False, BLOCK_ROWS=4, BLOCK_C=1024))

    assert key(20) == key(80) == key(1728)  # batch 5 at 2 x 2, batch 5 at 4 x 4, batch 27 at 8 x 8


def test_cross_scan_rows_and_columns_share_a_variant():
    from nnunetv2_sa_umamba.ops.cross_scan import kernels

    x, xs = torch.empty(5, 16, 16, 192, dtype=torch.float16), torch.empty(5, 4, 192, 256, dtype=torch.bfloat16)
    rows, columns = (str(_specialization(kernels._scan_kernel, x, xs, *orientation[:4], 192, 256, *orientation[4:],
                                         BLOCK_N=16, BLOCK_D=64))
                     for orientation in kernels._orientations(16, 16))
    assert rows == columns


def test_scan_lengths_of_a_large_image_share_a_variant():
    from nnunetv2_sa_umamba.ops.scan import kernels

    def key(length, d_inner):
        u = torch.empty(2, 4 * d_inner, length, dtype=torch.bfloat16)
        a, b = torch.empty(4 * d_inner, 16), torch.empty(2, 4, 16, length, dtype=torch.bfloat16)
        _, sizes, meta = kernels._launch_geometry(u, a, b)
        meta.pop("num_warps")
        return str(_specialization(kernels._scan_forward_kernel, u, u, a, b, b, a, a, u, u, **sizes, HAS_D=True,
                                   HAS_BIAS=True, SOFTPLUS=True, WRITE_Y=True, WRITE_STATES=False, **meta))

    # SA-UMamba's stages at 256 x 256: 128, 32, 8 and 2 chunks of 32 steps
    assert len({key(length, d) for length, d in zip((4096, 1024, 256, 64), (192, 384, 768, 1536), strict=True)}) == 1
