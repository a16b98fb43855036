"""Shared converter helpers: atomic writing, output folder rules, pairing, masks, reading, splits, workers."""
from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataset_conversion.common import (
    ConversionError,
    atomic_dataset_dir,
    binarize_mask,
    convert_image_mask_pair,
    pair_by_key,
    parallel_map,
    read_mask,
    read_rgb,
    resolve_dataset_dir,
    run_cli,
    seeded_partition,
    share,
    write_splits_final,
)

PERMISSIONS = pytest.mark.read_only


def _siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ------------------------------------------------------------------------------------ atomic writer

def test_atomic_dir_moves_complete_dataset_into_place(tmp_path):
    dest = tmp_path / "raw" / "Dataset900_X"
    with atomic_dataset_dir(dest, overwrite=False) as tmp:
        assert tmp.parent == dest.parent and not dest.exists()
        (tmp / "dataset.json").write_text("{}")
    assert (dest / "dataset.json").read_text() == "{}"
    assert _siblings(dest.parent) == ["Dataset900_X"]


def test_atomic_dir_uses_umask_permissions_not_private_ones(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_dataset_dir(tmp_path / "Dataset900_X", overwrite=False):
            pass
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "Dataset900_X").stat().st_mode) == 0o755


def test_atomic_dir_failure_leaves_nothing(tmp_path):
    dest = tmp_path / "Dataset900_X"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dataset_dir(dest, overwrite=False) as tmp:
            (tmp / "imagesTr").mkdir()
            raise RuntimeError("boom")
    assert _siblings(tmp_path) == []


def test_atomic_dir_never_touches_existing_dataset_without_overwrite(tmp_path):
    dest = tmp_path / "Dataset900_X"
    dest.mkdir()
    (dest / "keep.txt").write_text("old")
    with pytest.raises(ConversionError, match="--overwrite") as error:
        with atomic_dataset_dir(dest, overwrite=False):
            pytest.fail("the block must not run")
    assert str(dest) in str(error.value)
    assert (dest / "keep.txt").read_text() == "old"
    assert _siblings(tmp_path) == ["Dataset900_X"]


def test_atomic_dir_overwrite_replaces_only_when_complete(tmp_path):
    dest = tmp_path / "Dataset900_X"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dataset_dir(dest, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("failed half way")
    assert _siblings(dest) == ["old.txt"]
    with atomic_dataset_dir(dest, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert _siblings(dest) == ["new.txt"]
    assert _siblings(tmp_path) == ["Dataset900_X"]


def test_atomic_dir_refuses_a_source_inside_the_destination_before_writing(tmp_path):
    dest = tmp_path / "Dataset900_X"
    (dest / "download").mkdir(parents=True)
    (dest / "download" / "1.tif").write_text("source")
    for source in (dest / "download", dest):
        with pytest.raises(ConversionError, match="lies inside the dataset folder"):
            with atomic_dataset_dir(dest, overwrite=True, source=source):
                pytest.fail("the block must not run")
    assert (dest / "download" / "1.tif").read_text() == "source"
    assert _siblings(tmp_path) == ["Dataset900_X"]


def test_atomic_dir_refuses_a_symlinked_destination(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "Dataset900_X").symlink_to(target)
    with pytest.raises(ConversionError, match="symbolic link"):
        with atomic_dataset_dir(tmp_path / "raw" / "Dataset900_X", overwrite=True):
            pytest.fail("the block must not run")
    assert (tmp_path / "raw" / "Dataset900_X").is_symlink() and _siblings(target) == ["keep.txt"]
    assert _siblings(tmp_path / "raw") == ["Dataset900_X"]


def test_atomic_dir_explains_an_output_folder_it_cannot_create(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ConversionError, match="cannot create the output folder .*a_file.*-o/--output"):
        with atomic_dataset_dir(tmp_path / "a_file" / "raw" / "Dataset900_X", overwrite=False):
            pytest.fail("the block must not run")


@PERMISSIONS
def test_atomic_dir_explains_a_read_only_output_folder(tmp_path):
    (tmp_path / "raw").mkdir(mode=0o555)
    with pytest.raises(ConversionError, match="cannot write into .*raw.*-o/--output"):
        with atomic_dataset_dir(tmp_path / "raw" / "Dataset900_X", overwrite=False):
            pytest.fail("the block must not run")


def test_atomic_dir_failure_removes_the_output_folders_it_created(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_dataset_dir(tmp_path / "new" / "raw" / "Dataset900_X", overwrite=False):
            raise RuntimeError("failed")
    assert _siblings(tmp_path) == []
    (tmp_path / "mine").mkdir()
    with pytest.raises(RuntimeError):
        with atomic_dataset_dir(tmp_path / "mine" / "Dataset900_X", overwrite=False):
            raise RuntimeError("failed")
    assert _siblings(tmp_path) == ["mine"]  # a folder that existed before stays


@PERMISSIONS
def test_overwrite_replaces_an_old_dataset_with_read_only_entries(tmp_path, capsys):
    dest = tmp_path / "Dataset900_X"
    (dest / "imagesTr").mkdir(parents=True)
    (dest / "imagesTr" / "a.png").write_text("old")
    (dest / "imagesTr" / "a.png").chmod(0o444)
    (dest / "imagesTr").chmod(0o555)
    with atomic_dataset_dir(dest, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert _siblings(dest) == ["new.txt"] and _siblings(tmp_path) == ["Dataset900_X"]
    assert "Traceback" not in capsys.readouterr().err


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", ""])
    process.wait()
    return process.pid


def test_leftovers_of_a_killed_run_are_removed_only_if_ours(tmp_path):
    dest = tmp_path / "Dataset900_X"
    owners = {".Dataset900_X.partial-dead": {"pid": _dead_pid(), "host": socket.gethostname()},
              ".Dataset900_X.old-dead": {"pid": _dead_pid(), "host": socket.gethostname()},
              ".Dataset900_X.partial-running": {"pid": os.getpid(), "host": socket.gethostname()},
              ".Dataset900_X.partial-otherhost": {"pid": _dead_pid(), "host": "not-" + socket.gethostname()},
              ".Dataset900_X.partial-nomarker": None, ".Dataset901_Y.partial-dead": {"pid": _dead_pid(),
                                                                                    "host": socket.gethostname()}}
    for name, owner in owners.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "imagesTr").mkdir()
        if owner is not None:
            (tmp_path / name / ".saumamba_conversion.json").write_text(json.dumps(owner))
    with atomic_dataset_dir(dest, overwrite=False):
        pass
    assert _siblings(tmp_path) == sorted(["Dataset900_X", ".Dataset900_X.partial-running",
                                          ".Dataset900_X.partial-otherhost", ".Dataset900_X.partial-nomarker",
                                          ".Dataset901_Y.partial-dead"])
    assert _siblings(dest) == []  # the owner file does not end up in the dataset


# ------------------------------------------------------------------------------------ output folder

def test_output_defaults_to_nnunet_raw(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_raw", str(tmp_path))
    assert resolve_dataset_dir(None, 7, "Name") == tmp_path / "Dataset007_Name"
    assert resolve_dataset_dir(tmp_path / "elsewhere", 7, "Name") == tmp_path / "elsewhere" / "Dataset007_Name"


def test_output_without_nnunet_raw_is_explained(monkeypatch):
    monkeypatch.delenv("nnUNet_raw", raising=False)
    with pytest.raises(ConversionError, match="nnUNet_raw is not set.*-o/--output"):
        resolve_dataset_dir(None, 801, "Synapse")


def test_output_refuses_a_dataset_id_already_taken(tmp_path):
    (tmp_path / "Dataset801_Other").mkdir()
    with pytest.raises(ConversionError, match="Dataset801_Other.*-d/--dataset-id"):
        resolve_dataset_dir(tmp_path, 801, "Synapse")
    with pytest.raises(ConversionError, match="1..999"):
        resolve_dataset_dir(tmp_path, 1000, "Synapse")


# ------------------------------------------------------------------------------- pairing and masks

def test_pairing_names_the_unpaired_file(tmp_path):
    images = {"a": tmp_path / "img" / "a.jpg", "b": tmp_path / "img" / "b.jpg"}
    masks = {"a": tmp_path / "gt" / "a.png", "b": tmp_path / "gt" / "b.png"}
    assert [k for k, _, _ in pair_by_key(images, masks, tmp_path / "img", tmp_path / "gt")] == ["a", "b"]
    with pytest.raises(ConversionError, match=r"b\.jpg has no mask"):
        pair_by_key(images, {"a": masks["a"]}, tmp_path / "img", tmp_path / "gt")
    with pytest.raises(ConversionError, match=r"b\.png has no image"):
        pair_by_key({"a": images["a"]}, masks, tmp_path / "img", tmp_path / "gt")


def test_exact_masks_map_255_to_1_and_reject_other_values(tmp_path):
    mask = np.array([[0, 255], [255, 0]], dtype=np.uint8)
    np.testing.assert_array_equal(binarize_mask(mask, tmp_path / "m.png", "exact"), [[0, 1], [1, 0]])
    mask[0, 0] = 128
    with pytest.raises(ConversionError, match=r"m\.png: mask holds values 128"):
        binarize_mask(mask, tmp_path / "m.png", "exact")


def test_threshold_masks_use_127_and_reject_0_1_masks(tmp_path):
    mask = np.array([[0, 127, 128, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(binarize_mask(mask, tmp_path / "m.tif", "threshold"), [[0, 0, 1, 1]])
    np.testing.assert_array_equal(binarize_mask(np.zeros((2, 2), np.uint8), tmp_path / "m.tif", "threshold"), 0)
    with pytest.raises(ConversionError, match=r"m\.tif: largest mask value is 1"):
        binarize_mask(np.array([[0, 1]], dtype=np.uint8), tmp_path / "m.tif", "threshold")


def test_reading_keeps_pixels_and_names_broken_files(tmp_path):
    rgb = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    Image.fromarray(rgb).save(tmp_path / "ok.png")
    np.testing.assert_array_equal(read_rgb(tmp_path / "ok.png"), rgb)
    np.testing.assert_array_equal(read_mask(tmp_path / "ok.png"), rgb[..., 0])

    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(tmp_path / "cut.jpg", quality=95)
    data = (tmp_path / "cut.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match=r"cut\.jpg: unreadable or truncated"):
        read_rgb(tmp_path / "cut.jpg")
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ConversionError, match=r"notes\.png: unreadable"):
        read_mask(tmp_path / "notes.png")


def test_pair_conversion_rejects_size_mismatch_naming_both_files(tmp_path):
    Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(tmp_path / "img.png")
    Image.fromarray(np.zeros((4, 6), np.uint8)).save(tmp_path / "mask.png")
    job = (tmp_path / "img.png", tmp_path / "mask.png", tmp_path / "o.png", tmp_path / "o_seg.png")
    with pytest.raises(ConversionError, match=r"mask\.png is 6x4 pixels but its image .*img\.png is 5x4"):
        convert_image_mask_pair(job, "exact")
    assert not (tmp_path / "o.png").exists()


# ------------------------------------------------------------------------------------------- splits

def test_seeded_partition_is_deterministic_disjoint_and_order_free():
    ids = [f"case{i:03d}" for i in range(50)]
    first = seeded_partition(ids, 3, [35, 15])
    assert first == seeded_partition(list(reversed(ids)), 3, [35, 15])
    assert [len(p) for p in first] == [35, 15]
    assert not set(first[0]) & set(first[1]) and set(first[0]) | set(first[1]) == set(ids)
    assert first != seeded_partition(ids, 4, [35, 15])
    with pytest.raises(ValueError):
        seeded_partition(ids, 3, [30, 15])


def test_rounded_shares_give_the_paper_counts():
    # ISIC 2018 7:3 -> 1886/808 (VM-UNet's counts), ISIC 2017 -> 1505/645, CVC 10 % of 612 -> 61
    assert (2694 - share(2694, 3), share(2694, 3)) == (1886, 808)
    assert (2150 - share(2150, 3), share(2150, 3)) == (1505, 645)
    assert share(612, 1) == 61


def test_splits_final_refuses_overlapping_folds(tmp_path):
    with pytest.raises(ValueError, match="both train and val"):
        write_splits_final(tmp_path, [{"train": ["a", "b"], "val": ["b"]}])


# ----------------------------------------------------------------------------------- workers and CLI

def test_parallel_map_keeps_order_and_reraises_worker_errors(tmp_path):
    jobs = []
    for i in range(4):
        Image.fromarray(np.full((3, 4 + i, 3), i, np.uint8)).save(tmp_path / f"{i}.png")
        Image.fromarray(np.full((3, 4 + i), 255 * (i % 2), np.uint8)).save(tmp_path / f"{i}_m.png")
        jobs.append((tmp_path / f"{i}.png", tmp_path / f"{i}_m.png", tmp_path / f"{i}_o.png", tmp_path / f"{i}_os.png"))
    convert = partial(convert_image_mask_pair, mask_rule="exact")
    assert parallel_map(convert, jobs, num_workers=2, desc="test") == [(3, 4), (3, 5), (3, 6), (3, 7)]
    Image.fromarray(np.full((3, 6), 7, np.uint8)).save(tmp_path / "2_m.png")
    with pytest.raises(ConversionError, match=r"2_m\.png: mask holds values 7"):
        parallel_map(convert, jobs, num_workers=2, desc="test")


def test_cli_prints_bad_input_as_one_line_and_fails(capsys):
    def convert() -> Path:
        raise ConversionError("/data/x.png: broken; re-download it")
    assert run_cli(convert, "saumamba_convert_x") == 1
    err = capsys.readouterr().err
    # the same form as argparse's own errors and the evaluator's
    assert err == "saumamba_convert_x: error: /data/x.png: broken; re-download it\n"
