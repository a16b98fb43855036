"""The benchmark script's CPU smoke mode runs every row and writes its JSON."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_benchmark_smoke_mode_writes_all_rows(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "benchmark_network.py"), "--smoke",
                             "--device", "cpu", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [r["model"] for r in rows] == ["reference", "fast/torch", "nnunet_plain"]
    assert all(r["train_ms"] > 0 and r["infer_ms"] > 0 for r in rows)
    assert "| 1x3x64x64 | fp32 | reference |" in result.stdout
