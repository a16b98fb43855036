"""Recording Triton's compilations (ops/compile_stats.py)."""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from nnunetv2_sa_umamba.ops.compile_stats import (
    Compilation,
    CompileRecord,
    record_compilations,
    variant_description,
)

knobs = pytest.importorskip("triton").knobs if hasattr(pytest.importorskip("triton"), "knobs") else None
needs_listener = pytest.mark.skipif(knobs is None or not hasattr(knobs.compilation, "listener"),
                                    reason="Triton's compilation listener needs Triton 3.4 or later")


def test_variant_description_names_types_divisibility_and_constexprs():
    signature = {"x_ptr": "*fp16", "rows": "i32", "stride": "i32", "C": "constexpr", "GATE": "constexpr"}
    constants = {(3,): 96, (4,): True}
    attrs = {(0,): [["tt.divisibility", 16]], (2,): [["tt.divisibility", 16]]}
    assert (variant_description(signature, constants, attrs, num_warps=8)
            == "x_ptr:*fp16/16, rows:i32, stride:i32/16, C=96, GATE=True [8 warps]")


def test_record_totals_per_kernel_and_formats():
    record = CompileRecord(observable=True, compilations=[
        Compilation("_forward_kernel", "C=96", 0.5, False), Compilation("_forward_kernel", "C=192", 0.7, False),
        Compilation("_scan_kernel", "n:i32", 2.0, False), Compilation("_scan_kernel", "n:i32/16", 0.001, True)])
    assert [c.variant for c in record.compiled] == ["C=96", "C=192", "n:i32"]
    assert record.seconds == pytest.approx(3.201)
    table = record.per_kernel()
    assert list(table) == ["_scan_kernel", "_forward_kernel"]  # slowest first
    assert table["_forward_kernel"] == {"compiled": 2, "cache_hits": 0, "seconds": pytest.approx(1.2)}
    assert table["_scan_kernel"]["cache_hits"] == 1
    summary = record.summary()
    assert (summary["compiled"], summary["cache_hits"], summary["seconds"]) == (3, 1, 3.201)
    assert "3 compiled, 1 from the on-disk cache" in record.format()
    assert "C=192" in record.format(variants=True) and "C=192" not in record.format()
    assert "not observable" in CompileRecord(observable=False).format()


@needs_listener
def test_record_takes_triton_listener_calls_and_restores_the_previous_listener():
    calls = []
    previous = knobs.compilation.listener
    knobs.compilation.listener = lambda **kwargs: calls.append(kwargs)
    try:
        src = SimpleNamespace(fn=SimpleNamespace(__name__="_kernel"), signature={"x_ptr": "*fp32", "B": "constexpr"},
                              constants={(1,): 64}, attrs={(0,): [["tt.divisibility", 16]]})
        times = SimpleNamespace(ir_initialization=100_000, lowering_stages=[("ttir", 200_000), ("ptx", 700_000)],
                                store_results=0)
        with record_compilations() as record:
            knobs.compilation.listener(src=src, metadata={"num_warps": 4}, metadata_group={}, times=times,
                                       cache_hit=False)
        assert record.observable
        assert record.compilations == [Compilation("_kernel", "x_ptr:*fp32/16, B=64 [4 warps]", 1.0, False)]
        assert len(calls) == 1  # the listener set before still heard it
        assert knobs.compilation.listener is not None and knobs.compilation.listener is not record
    finally:
        knobs.compilation.listener = previous


@needs_listener
def test_interpreted_kernels_compile_nothing():
    from nnunetv2_sa_umamba.ops.layernorm import layer_norm

    norm = torch.nn.LayerNorm(8)
    with record_compilations() as record:
        layer_norm(torch.randn(4, 8), norm, kernels="triton")
    assert record.observable and record.compilations == []


# in a process of its own: the interpreter, which the tests turn on, patches triton.language for the whole process
_REAL_COMPILE = """
import json, sys
import triton, triton.language as tl
from triton.backends import backends
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from nnunetv2_sa_umamba.ops.compile_stats import record_compilations
if "nvidia" not in backends:
    sys.exit(3)

@triton.jit
def double(x_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + offsets, tl.load(x_ptr + offsets, mask=offsets < n) * 2, mask=offsets < n)

src = ASTSource(double, {"x_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"}, {"BLOCK": 128}, {})
with record_compilations() as record:
    for _ in range(2):
        triton.compile(src, target=GPUTarget("cuda", 90, 32))
print(json.dumps([[c.kernel, c.variant, c.seconds, c.cache_hit] for c in record.compilations]))
"""


@needs_listener
def test_a_real_compile_then_a_cache_hit(tmp_path):
    """Compiled for a Hopper GPU without one: Triton's CUDA backend and its ptxas run on the CPU."""
    script = tmp_path / "compile.py"  # @triton.jit reads its function's source from a file
    script.write_text(_REAL_COMPILE)
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path / "cache")}
    child = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                           timeout=300, cwd=Path(__file__).resolve().parents[1])
    if child.returncode == 3:
        pytest.skip("Triton's CUDA backend is not installed")
    assert child.returncode == 0, child.stderr[-3000:]
    (kernel, variant, seconds, hit), (_, _, _, second_hit) = json.loads(child.stdout.strip().splitlines()[-1])
    assert (kernel, hit, second_hit) == ("double", False, True)
    assert variant.startswith("x_ptr:*fp32, n:i32, BLOCK=128") and seconds > 0
