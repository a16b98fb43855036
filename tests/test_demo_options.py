"""saumamba_demo on bad options and on reruns: every option is checked before the output folder is touched,
and a rerun deletes only what the demo wrote (no nnU-Net subprocess runs here)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nnunetv2_sa_umamba.demo import run as demo
from nnunetv2_sa_umamba.demo.run import MARKER, prepare_output_folder

PARAMS = {"num_train": 100, "num_test": 20, "image_size": 64, "seed": 0}


def _earlier_demo_folder(root: Path) -> dict[str, str]:
    """A folder as a finished demo leaves it, plus a file the user put there; returns {relative path: text}."""
    files = {MARKER: json.dumps(PARAMS), "nnUNet_raw/Dataset950_SAUMambaDemo/dataset.json": "{}",
             "logs/3_train.log": "epoch 0", "demo_summary.json": "{}", "my_notes.txt": "keep me"}
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return files


def _contents(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in root.rglob("*") if p.is_file()}


def test_unavailable_device_is_refused_before_the_folder_is_touched(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    files = _earlier_demo_folder(tmp_path / "demo")
    assert demo.main(["-o", str(tmp_path / "demo"), "--device", "cuda"]) == 1
    captured = capsys.readouterr()
    assert "saumamba_demo: error: --device cuda" in captured.err
    assert "Removing" not in captured.out
    assert _contents(tmp_path / "demo") == files


@pytest.mark.parametrize("option, value", [("--num-train", "3"), ("--num-test", "0"), ("--image-size", "8"),
                                           ("--trainer", "nnUNetTrainer SAUMamba")])
def test_bad_options_are_refused_before_the_folder_is_touched(tmp_path, capsys, option, value):
    files = _earlier_demo_folder(tmp_path / "demo")
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["-o", str(tmp_path / "demo"), "--device", "cpu", option, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"saumamba_demo: error: argument {option}" in err and "Traceback" not in err
    assert _contents(tmp_path / "demo") == files


def test_a_rerun_deletes_only_what_the_demo_wrote(tmp_path, capsys):
    root = tmp_path / "demo"
    _earlier_demo_folder(root)
    (root / "my_results").mkdir()
    (root / "my_results" / "table.csv").write_text("1,2")
    assert prepare_output_folder(root, keep=False, params={**PARAMS, "seed": 1}) is False
    assert _contents(root) == {MARKER: json.dumps({**PARAMS, "seed": 1}), "my_notes.txt": "keep me",
                               "my_results/table.csv": "1,2"}
    assert "nnUNet_raw" in capsys.readouterr().out
