"""The benchmark scripts' CPU smoke modes run every row and write their JSON; the network benchmark's optimizer."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
NETWORK_BENCHMARK = REPO / "benchmarks" / "benchmark_network.py"
# a test that runs a benchmark script end to end in its own Python process
slow = pytest.mark.slow


@pytest.fixture
def network_bench():
    spec = importlib.util.spec_from_file_location("benchmark_network", NETWORK_BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_rows_without_fused_adamw_get_torchs_default_implementation(network_bench):
    """fused=False given explicitly would also keep torch from its multi-tensor (foreach) AdamW on CUDA and run the
    single-tensor loop, which the released code does not."""
    model = torch.nn.Linear(4, 4)
    optimizer = network_bench.adamw(model, fused=False, device=torch.device("cuda"))
    assert optimizer.defaults["fused"] is None and optimizer.defaults["foreach"] is None
    assert (optimizer.defaults["lr"], optimizer.defaults["weight_decay"]) == (1e-3, 1e-2)
    assert not network_bench.uses_fused_optimizer("reference")


@slow
def test_benchmark_smoke_mode_writes_all_rows(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, str(NETWORK_BENCHMARK), "--smoke",
                             "--device", "cpu", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [r["model"] for r in rows] == ["reference", "fast/torch", "nnunet_plain"]
    assert all(r["train_ms"] > 0 and r["infer_ms"] > 0 for r in rows)
    # the host queues a step no later than the step completes
    assert all(0 < r["train_issue_ms"] <= r["train_ms"] for r in rows)
    assert "| 1x3x64x64 | fp32 | reference |" in result.stdout


@slow
def test_block_benchmark_smoke_mode_covers_every_module(tmp_path):
    out = tmp_path / "blocks.json"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "benchmark_blocks.py"), "--smoke",
                             "--device", "cpu", "--implementations", "reference", "fast", "--json", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["rows"]
    for implementation in ("reference", "fast"):
        mine = [r for r in rows if r["implementation"] == implementation]
        counts = {}
        for r in mine:
            counts[r["module"]] = counts.get(r["module"], 0) + r["count"]
        # 8 RSSS encoder blocks and 7 VSS decoder blocks: 15 SS2Ds and scans, 8 RFAConvs
        assert counts["SS2D"] == counts["selective_scan (in SS2D)"] == 15
        assert counts["RFAConv"] == 8 and counts["RSSSBlock"] == 8 and counts["VSSBlock"] == 7
        assert all(r["forward_ms"] > 0 and r["forward_backward_ms"] >= 0 for r in mine)
    assert "| fast | RFAConv |" in result.stdout


@slow
def test_cold_start_times_each_model_in_a_new_process(tmp_path):
    out = tmp_path / "cold.json"
    result = subprocess.run([sys.executable, str(NETWORK_BENCHMARK), "--smoke",
                             "--device", "cpu", "--cold-start", "--cold-start-steps", "2", "--models", "reference",
                             "nnunet_plain", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [r["model"] for r in rows] == ["reference", "nnunet_plain"]
    for r in rows:
        assert r["note"] == "" and r["kernel_cache"] == "empty"
        assert r["build_s"] > 0 and r["first_step_s"] > 0 and r["next_steps_s"] > 0 and r["steady_ms"] > 0
        # the parent's clock covers the child's whole life: imports, building, every step
        assert r["process_s"] > r["build_s"] + r["first_step_s"] + r["next_steps_s"]
    assert "| 1x3x64x64 | fp32 | reference | empty |" in result.stdout


@slow
def test_cold_start_reports_a_failed_child_and_goes_on(tmp_path):
    result = subprocess.run([sys.executable, str(NETWORK_BENCHMARK), "--smoke",
                             "--device", "cpu", "--cold-start", "--cold-start-steps", "1", "--classes", "0",
                             "--models", "nnunet_plain"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "| nnunet_plain | empty |" in result.stdout and "failed:" in result.stdout

