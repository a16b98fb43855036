"""The benchmark scripts' CPU smoke modes run every row and write their JSON; the network benchmark's optimizer and
its row of the released code (a fake package stands in for the user's checkout of it)."""
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
NETWORK_BENCHMARK = REPO / "benchmarks" / "benchmark_network.py"
SCAN_BENCHMARK = REPO / "benchmarks" / "benchmark_scan.py"
# a test that runs a benchmark script end to end in its own Python process
slow = pytest.mark.slow

# The released code's layout: models/vmunet/vmunet.py defines VMUNet; its modules import each other as models.vmunet.*
FAKE_RELEASED = {
    "models/vmunet/vmunet.py": """
import json
from pathlib import Path

from torch import nn

from models.vmunet.layers import head


class VMUNet(nn.Module):
    def __init__(self, input_channels=3, num_classes=1, depths=[2, 2, 9, 2], depths_decoder=[2, 9, 2, 2],
                 drop_path_rate=0.2, load_ckpt_path=None):
        super().__init__()
        built = dict(input_channels=input_channels, num_classes=num_classes, depths=depths,
                     depths_decoder=depths_decoder, drop_path_rate=drop_path_rate, load_ckpt_path=load_ckpt_path)
        Path(__file__).with_name("built.json").write_text(json.dumps(built))
        self.head = head(input_channels, num_classes)

    def forward(self, x):
        return self.head(x)
""",
    "models/vmunet/layers.py": """
from torch import nn


def head(in_channels, classes):
    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, classes, 1))
""",
}


def write_fake_released(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.fixture
def network_bench(benchmark_script):
    yield benchmark_script("benchmark_network")
    # the released code's package, imported by --released-code
    for name in [name for name in sys.modules if name == "models" or name.startswith("models.")]:
        del sys.modules[name]


def test_rows_without_fused_adamw_get_torchs_default_implementation(network_bench):
    """fused=False given explicitly would also keep torch from its multi-tensor (foreach) AdamW on CUDA and run the
    single-tensor loop, which the released code does not."""
    model = torch.nn.Linear(4, 4)
    optimizer = network_bench.adamw(model, fused=False, device=torch.device("cuda"))
    assert optimizer.defaults["fused"] is None and optimizer.defaults["foreach"] is None
    assert (optimizer.defaults["lr"], optimizer.defaults["weight_decay"]) == (1e-3, 1e-2)
    assert not network_bench.uses_fused_optimizer("reference") and not network_bench.uses_fused_optimizer("released")


class _AutotuneProbe(torch.nn.Module):
    """Records cuDNN's autotuning flag at every forward, in training and in eval mode."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, 1)
        self.seen = {True: set(), False: set()}

    def forward(self, x):
        self.seen[self.training].add(torch.backends.cudnn.benchmark)
        return self.conv(x)


@pytest.mark.parametrize("row, autotuned", [("reference", True), ("released", True), ("nnunet_plain", True),
                                            ("fast+graphs", False), ("fast/torch", False)])
def test_our_fast_rows_train_without_cudnn_autotuning_as_our_trainer(network_bench, monkeypatch, row, autotuned):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)  # as main sets it
    train_autotune = network_bench.autotunes_training(row, disabled=False)
    assert train_autotune is autotuned and not network_bench.autotunes_training(row, disabled=True)
    model = _AutotuneProbe()
    x, target = torch.randn(2, 3, 8, 8), torch.randint(0, 2, (2, 8, 8))
    network_bench.measure(model, x, target, "fp32", warmup=1, iters=1, train_autotune=train_autotune)
    # inference autotunes as nnUNetv2_predict does; the flag is back afterwards
    assert model.seen == {True: {autotuned}, False: {True}} and torch.backends.cudnn.benchmark


def test_released_code_missing_is_a_clear_error(network_bench, tmp_path, capsys):
    with pytest.raises(SystemExit):
        network_bench.parse_args(["--smoke", "--released-code", str(tmp_path / "SA-UMamba")])
    error = capsys.readouterr().err
    assert str(tmp_path / "SA-UMamba" / "models" / "vmunet" / "vmunet.py") in error
    assert "does not exist" in error and "github.com/xiaomengxin123/SA-UMamba" in error


def test_released_code_that_does_not_import_is_a_clear_error(network_bench, tmp_path, capsys):
    code = write_fake_released(tmp_path, {"models/vmunet/vmunet.py": "import mamba_ssm_not_installed_here\n"})
    with pytest.raises(SystemExit):
        network_bench.parse_args(["--smoke", "--released-code", str(code)])
    error = capsys.readouterr().err
    assert str(code / "models" / "vmunet" / "vmunet.py") in error
    assert "No module named 'mamba_ssm_not_installed_here'" in error and "mamba-ssm" in error
    assert str(code) not in sys.path


def test_released_row_needs_the_released_code(network_bench, capsys):
    with pytest.raises(SystemExit):
        network_bench.parse_args(["--smoke", "--models", "reference", "released"])
    assert "--models released needs --released-code DIR" in capsys.readouterr().err


def test_kernel_table_groups_gpu_kernels_by_name_per_step(network_bench):
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def event(name, us, device=cuda):
        return SimpleNamespace(name=name, device_time_total=us, device_type=device)

    events = [event("scan_bwd", 3000.0), event("copy", 100.0), event("scan_bwd", 5000.0), event("copy", 300.0),
              event("aten::mm", 9e9, cpu), event("a|b" + "x" * 200, 600.0)]
    lines = network_bench.kernel_time_table(events, steps=2).splitlines()
    # the CPU op is left out; the total first, then the largest kernel first, per step
    assert lines[2] == "| all kernels | 2 | 4.50 | 100 % |"
    assert lines[3] == "| `scan_bwd` | 1 | 4.000 | 88.9 % |"
    assert lines[4].startswith("| `a/b" + "x" * 114 + "...` | 0 | 0.300 | 6.7 % |")
    assert lines[5] == "| `copy` | 1 | 0.200 | 4.4 % |"
    assert len(network_bench.kernel_time_table(events, steps=2, rows=1).splitlines()) == 4


def test_profile_on_cpu_appends_the_operator_table_of_training_steps(network_bench, tmp_path):
    torch.manual_seed(0)
    model = network_bench.nnunet_plain_unet(3, 2, 64)
    x, target = torch.randn(1, 3, 64, 64), torch.randint(0, 2, (1, 64, 64))
    out = tmp_path / "profile.txt"
    out.write_text("earlier\n")
    network_bench.profile_training_step(model, x, target, "fp32", out, "a row", fused_optimizer=False)
    text = out.read_text()
    assert text.startswith("earlier\n\n## a row\n")
    assert "Self CPU" in text and "aten::convolution_backward" in text
    assert "Kernels per training step" not in text  # no GPU kernels on the CPU


def test_cpu_rows_are_the_reference_the_torch_scan_and_nnunet_plus_the_released_code_when_given(network_bench,
                                                                                                  tmp_path):
    def models(argv):
        args = network_bench.parse_args(["--smoke", "--device", "cpu", *argv])
        return [name for name, _ in network_bench.model_specs(args, 3, args.classes, 64, torch.device("cpu"))]

    assert models([]) == ["reference", "fast/torch", "nnunet_plain"]
    code = write_fake_released(tmp_path / "SA-UMamba", FAKE_RELEASED)
    assert models(["--released-code", str(code)]) == ["reference", "released", "fast/torch", "nnunet_plain"]


@slow
def test_benchmark_smoke_mode_writes_all_rows_and_builds_the_released_config(tmp_path):
    """Every CPU row, the released code's included (a fake stands in for it), in one run of the script."""
    code = write_fake_released(tmp_path / "SA-UMamba", FAKE_RELEASED)
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, str(NETWORK_BENCHMARK), "--smoke", "--device", "cpu", "--released-code",
                             str(code), "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [r["model"] for r in rows] == ["reference", "released", "fast/torch", "nnunet_plain"]
    assert all(r["train_ms"] > 0 and r["infer_ms"] > 0 and r["note"] == "" for r in rows)
    # the host queues a step no later than the step completes
    assert all(0 < r["train_issue_ms"] <= r["train_ms"] for r in rows)
    # the released configs/config_setting.py, 2 classes, no checkpoint
    assert json.loads((code / "models" / "vmunet" / "built.json").read_text()) == dict(
        input_channels=3, num_classes=2, depths=[2, 2, 2, 2], depths_decoder=[2, 2, 2, 1], drop_path_rate=0.2,
        load_ckpt_path=None)
    assert "| 1x3x64x64 | fp32 | reference |" in result.stdout and "| 1x3x64x64 | fp32 | released |" in result.stdout


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


def run_smoke(script: Path, out: Path) -> tuple[list[dict], str]:
    """(the JSON rows, stdout) of ``script --smoke`` in its own process, which must succeed. The child starts without
    this session's TRITON_INTERPRET, as from a shell: --smoke itself must turn Triton's interpreter on."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(script), "--smoke", "--json", str(out)], capture_output=True,
                            text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(out.read_text())["rows"], result.stdout


@slow
def test_scan_benchmark_smoke_mode_times_the_triton_scans_at_every_stage(tmp_path):
    rows, stdout = run_smoke(SCAN_BENCHMARK, tmp_path / "scan.json")
    # no mamba-ssm kernel on the CPU: the Triton kernels alone, the sequential ones the reference of each stage
    assert [(r["stage"], r["implementation"]) for r in rows] == [
        (1, "sequential"), (1, "triton"), (2, "sequential"), (2, "triton")]
    assert all(r["forward_ms"] > 0 and r["forward_backward_ms"] > r["forward_ms"] for r in rows)
    assert all(r["per_step_ms"] == r["count"] * r["forward_backward_ms"] for r in rows)
    assert [r["max_err"] == 0.0 for r in rows] == [True, False, True, False]
    assert all(r["max_err"] < 1e-5 for r in rows)
    assert "| 1 | 1x8x12 | sequential |" in stdout and "| 1 | 1x8x12 | triton |" in stdout
    assert "cuda: no rows" in stdout and "cuda+sequential: no rows" in stdout


@pytest.fixture
def scan_bench(benchmark_script):
    return benchmark_script("benchmark_scan")


def test_scan_benchmark_stages_are_ss2ds_of_the_default_network(scan_bench):
    from nnunetv2_sa_umamba.architectures.sa_umamba import SAUMamba
    defaults = {name: p.default for name, p in inspect.signature(SAUMamba).parameters.items()}
    # 4 directions x d_inner (2 x dim) channels; a 64 x 64 first stage at 256 x 256, halved per stage; encoder
    # blocks plus decoder blocks (decoder_depths lists the deepest stage first)
    expected = [(4 * 2 * dim, (64 >> i) ** 2, depth + decoder)
                for i, (dim, depth, decoder) in enumerate(zip(defaults["dims"], defaults["depths"],
                                                              defaults["decoder_depths"][::-1], strict=True))]
    assert scan_bench.STAGES == expected
    assert defaults["d_state"] == scan_bench.D_STATE


def test_scan_benchmark_without_gpu_explains(scan_bench, capsys):
    if torch.cuda.is_available():
        pytest.skip("the error is for machines without a CUDA GPU")
    with pytest.raises(SystemExit):
        scan_bench.parse_args([])
    assert "no CUDA GPU" in capsys.readouterr().err


def run_cold_start(network_bench, monkeypatch, capsys, argv: list[str]) -> str:
    """benchmark_network.py's main with ``argv`` here, in the test's process: only the children it starts, one per
    model, are new Python processes (each takes seconds to import torch and nnU-Net). Returns its standard output."""
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)  # main sets it
    assert network_bench.main(["--smoke", "--device", "cpu", "--cold-start", *argv]) == 0
    return capsys.readouterr().out


@slow
def test_cold_start_times_each_model_in_a_new_process(network_bench, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cold.json"
    stdout = run_cold_start(network_bench, monkeypatch, capsys, [
        "--cold-start-steps", "2", "--models", "reference", "fast/torch", "nnunet_plain", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["model"] for r in rows] == ["reference", "fast/torch", "nnunet_plain"]
    # only our fast path compiles ahead (on the CPU nothing compiles: the pre-compile returns at once)
    assert [r["precompile_s"] is not None for r in rows] == [False, True, False]
    for r in rows:
        assert r["note"] == "" and r["kernel_cache"] == "empty"
        assert r["build_s"] > 0 and r["first_step_s"] > 0 and r["next_steps_s"] > 0 and r["steady_ms"] > 0
        # the parent's clock covers the child's whole life: imports, building, every step
        assert r["process_s"] > r["build_s"] + r["first_step_s"] + r["next_steps_s"]
    assert "| 1x3x64x64 | fp32 | reference | empty |" in stdout


@slow
def test_cold_start_reports_a_failed_child_and_goes_on(network_bench, monkeypatch, capsys):
    stdout = run_cold_start(network_bench, monkeypatch, capsys, [
        "--cold-start-steps", "1", "--classes", "0", "--models", "nnunet_plain"])
    assert "| nnunet_plain | empty |" in stdout and "failed:" in stdout


@slow
def test_rfaconv_benchmark_smoke_mode_times_every_kernel_with_its_own_tile_first(benchmark_script, tmp_path, capsys):
    # in this process: Triton's interpreter is on here (conftest.py) off CUDA, as --smoke needs
    if torch.cuda.is_available():
        pytest.skip("--smoke runs Triton's interpreter, which must be on before Triton is imported")
    out = tmp_path / "rfaconv.json"
    assert benchmark_script("benchmark_rfaconv").main(["--smoke", "--json", str(out)]) == 0
    rows, stdout = json.loads(out.read_text())["rows"], capsys.readouterr().out
    kernels = ["stats", "weighted", "backward_reduce", "backward_features", "backward_input"]
    assert [r["kernel"] for r in rows] == [k for k in kernels for _ in range(2)]
    assert [r["own_tile"] for r in rows] == [True, False] * len(kernels)
    # every tile ran and computed what the kernel's own tile computes
    assert all(r["note"] == "" and r["sum_ms"] > 0 and r["max_diff"] < 1e-5 for r in rows)
    assert "| backward_features | 16 x 16, 4 warps, 16/program (own) |" in stdout


def test_rfaconv_benchmark_tiles(benchmark_script, monkeypatch):
    from nnunetv2_sa_umamba.ops.rfaconv import kernels
    bench = benchmark_script("benchmark_rfaconv")
    monkeypatch.setattr(kernels, "CONFIGS", {"weighted": (8, 16, 1, 1), "stats": (16, 16, 4, 1)})
    monkeypatch.setattr(kernels, "DOT_CONFIGS", {"stats": (32, 32, 8, 1)})
    tiles = [(8, 16, 1), (16, 32, 2)]
    # the own tile first (the one used under autocast), then each tile once; no dot kernel on fewer than 16 positions
    assert bench.candidate_tiles(kernels, "weighted", tiles) == [(8, 16, 1, 1), (16, 32, 2, 1)]
    assert bench.candidate_tiles(kernels, "stats", tiles) == [(32, 32, 8, 1), (16, 32, 2, 1), (16, 32, 2, 4)]
    with bench.launch_tile(kernels, "stats", (16, 16, 1, 4)):
        assert kernels.CONFIGS["stats"] == kernels.DOT_CONFIGS["stats"] == (16, 16, 1, 4)
    assert kernels.CONFIGS["stats"] == (16, 16, 4, 1) and kernels.DOT_CONFIGS["stats"] == (32, 32, 8, 1)
    with pytest.raises(Exception, match="POSITIONSxCHANNELSxWARPS"):
        bench.parse_tile("8x16")


PTXAS_REPORT = """ptxas info    : Compiling entry function '_backward_features_kernel' for 'sm_90a'
ptxas info    : Function properties for _backward_features_kernel
    288 bytes stack frame, 408 bytes spill stores, 492 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 288 bytes cumulative stack size"""


def test_kernel_registers_reads_ptxas_and_refuses_bad_tiles_and_the_interpreter(benchmark_script, monkeypatch):
    registers = benchmark_script("kernel_registers")
    assert registers.parse_ptxas(PTXAS_REPORT) == dict(registers=255, spill_stores=408, spill_loads=492, stack=288)
    with pytest.raises(ValueError, match="registers"):
        registers.parse_ptxas("ptxas info    : Compiling entry function 'k' for 'sm_90a'")
    assert registers.parse_tile("16x16x8x16") == (16, 16, 8, 16)
    with pytest.raises(SystemExit):
        registers.parse_args(["--tiles", "16x16x8"])  # warps without tiles per program
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(SystemExit, match="TRITON_INTERPRET=0"):
        registers.main(["--kernels", "backward_input"])


@slow
def test_kernel_registers_compiles_for_hopper_without_a_gpu():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "kernel_registers.py"), "--kernels",
                             "backward_input", "--tiles", "4x32x1x1"], capture_output=True, text=True, timeout=600,
                            env=env)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| backward_input |")]
    assert len(rows) == 2 and "(launch tile)" in rows[0] and "| 4x32x1x1 |" in rows[1]
    for row in rows:
        registers = int(row.split("|")[3])
        assert 0 < registers <= 255
