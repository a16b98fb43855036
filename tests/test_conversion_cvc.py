"""CVC-ClinicDB converter, end to end on tiny synthetic copies of the TIFF release and the PNG mirror."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from dataset_conversion.common import ConversionError
from dataset_conversion.cvc_clinicdb import (
    SEQUENCE_FRAMES,
    convert_cvc_clinicdb,
    cvc_split,
    cvc_video_split,
    main,
    sequence_of,
)


def make_cvc(root: Path, frames: int = 20, png: bool = False, names=("Original", "Ground Truth"),
             size=(10, 12)) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Frames 1..N as RGB TIFFs (or PNGs) with 3-channel masks whose values are noisy around 0 and 255.
    Returns {frame: (rgb, expected {0, 1} mask)}."""
    rng = np.random.default_rng(frames)
    (root / names[0]).mkdir(parents=True)
    (root / names[1]).mkdir()
    cases = {}
    for frame in range(1, frames + 1):
        rgb = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        foreground = np.zeros(size, bool)
        foreground[2:2 + frame % 5 + 2, 3:9] = True
        noisy = np.where(foreground, rng.integers(128, 256, size), rng.integers(0, 128, size)).astype(np.uint8)
        mask = np.stack([noisy, noisy // 2, np.zeros_like(noisy)], axis=-1)  # only the first channel counts
        if png:
            Image.fromarray(rgb).save(root / names[0] / f"{frame}.png")
            Image.fromarray(mask).save(root / names[1] / f"{frame}.png")
        else:
            tifffile.imwrite(root / names[0] / f"{frame}.tif", rgb, photometric="rgb")
            tifffile.imwrite(root / names[1] / f"{frame}.tif", mask, photometric="rgb")
        cases[frame] = (rgb, foreground.astype(np.uint8))
    return cases


def _ids(folder: Path, suffix: str) -> list[str]:
    return sorted(p.name[: -len(suffix)] for p in folder.iterdir())


def test_tiff_release_end_to_end_with_seeded_split(tmp_path):
    cases = make_cvc(tmp_path / "download" / "CVC-ClinicDB")
    dest = convert_cvc_clinicdb(tmp_path / "download", tmp_path / "raw", seed=5, num_workers=2, verify=False)

    assert dest.name == "Dataset804_CVCClinicDB"
    (fold,) = json.loads((dest / "splits_final.json").read_text())
    record = json.loads((dest / "conversion_split.json").read_text())
    train, val, test = fold["train"], fold["val"], record["test"]
    assert (len(train), len(val), len(test)) == (16, 2, 2)
    assert (record["train"], record["val"], record["seed"]) == (train, val, 5)
    assert _ids(dest / "imagesTr", "_0000.png") == _ids(dest / "labelsTr", ".png") == sorted(train + val)
    assert _ids(dest / "imagesTs", "_0000.png") == _ids(dest / "labelsTs", ".png") == sorted(test)
    assert set(train + val + test) == {f"cvc_{i:04d}" for i in cases}
    for frame, (rgb, mask) in cases.items():
        part = "Ts" if f"cvc_{frame:04d}" in test else "Tr"
        np.testing.assert_array_equal(np.asarray(Image.open(dest / f"images{part}" / f"cvc_{frame:04d}_0000.png")), rgb)
        np.testing.assert_array_equal(np.asarray(Image.open(dest / f"labels{part}" / f"cvc_{frame:04d}.png")), mask)
    assert json.loads((dest / "dataset.json").read_text())["numTraining"] == 18


def test_split_of_612_frames_is_490_61_61_and_reproducible():
    ids = [f"cvc_{i:04d}" for i in range(1, 613)]
    train, val, test = cvc_split(ids, seed=0)
    assert (len(train), len(val), len(test)) == (490, 61, 61)
    assert set(train) | set(val) | set(test) == set(ids) and not (set(train) & set(val) or set(test) & set(train + val))
    assert cvc_split(list(reversed(ids)), seed=0) == (train, val, test)
    assert cvc_split(ids, seed=1)[2] != test


def test_png_mirror_with_other_folder_names_matches_the_tiff_release(tmp_path):
    cases = make_cvc(tmp_path / "tif" / "CVC-ClinicDB", frames=12)
    png_root = tmp_path / "png" / "PNG"
    png_root.mkdir(parents=True)
    for source, target in (("Original", "original"), ("Ground Truth", "ground_truth")):
        (png_root / target).mkdir()
        for path in (tmp_path / "tif" / "CVC-ClinicDB" / source).iterdir():
            # zero-padded names: pairing is on the frame number, not the text
            Image.open(path).save(png_root / target / f"{int(path.stem):03d}.png")
    from_tif = convert_cvc_clinicdb(tmp_path / "tif", tmp_path / "a", num_workers=1, verify=False)
    from_png = convert_cvc_clinicdb(tmp_path / "png", tmp_path / "b", num_workers=1, verify=False)
    for folder in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        names = sorted(p.name for p in (from_tif / folder).iterdir())
        assert names == sorted(p.name for p in (from_png / folder).iterdir())
        for name in names:
            np.testing.assert_array_equal(np.asarray(Image.open(from_tif / folder / name)),
                                          np.asarray(Image.open(from_png / folder / name)))
    assert len(cases) == 12


def test_kaggle_layout_with_png_and_tif_copies_uses_the_tiffs(tmp_path):
    make_cvc(tmp_path / "archive" / "TIF", frames=10)
    make_cvc(tmp_path / "archive" / "PNG", frames=10, png=True)
    dest = convert_cvc_clinicdb(tmp_path / "archive", tmp_path / "raw", num_workers=1, verify=False)
    assert json.loads((dest / "dataset.json").read_text())["conversion"]["source"] == "TIF/Original"


def _damage(root: Path, what: str) -> str:
    if what == "missing mask":
        (root / "Ground Truth" / "7.tif").unlink()
        return "7.tif"
    if what == "0/1 mask":
        tifffile.imwrite(root / "Ground Truth" / "3.tif", np.ones((10, 12), np.uint8))
        return "3.tif"
    if what == "truncated tiff":
        path = root / "Original" / "5.tif"
        path.write_bytes(path.read_bytes()[:200])
        return "5.tif"
    if what == "size mismatch":
        tifffile.imwrite(root / "Ground Truth" / "9.tif", np.zeros((11, 12), np.uint8))
        return "9.tif"
    if what == "not a frame":
        (root / "Original" / "cover.tif").write_bytes(b"")
        return "cover.tif"
    raise ValueError(what)


@pytest.mark.parametrize("what", ["missing mask", "0/1 mask", "truncated tiff", "size mismatch", "not a frame"])
def test_errors_name_the_file_and_write_nothing(tmp_path, capsys, what):
    make_cvc(tmp_path / "download")
    name = _damage(tmp_path / "download", what)
    code = main(["-i", str(tmp_path / "download"), "-o", str(tmp_path / "raw"), "-np", "1", "--no-verify"])
    err = capsys.readouterr().err
    assert code == 1 and name in err and "Traceback" not in err
    assert err.startswith("saumamba_convert_cvc: error: ")
    assert not (tmp_path / "raw").exists()  # not even the -o folder the run would have created


def test_missing_folders_are_explained(tmp_path):
    (tmp_path / "download" / "Original").mkdir(parents=True)
    with pytest.raises(ConversionError, match="no CVC-ClinicDB folders found.*Ground Truth"):
        convert_cvc_clinicdb(tmp_path / "download", tmp_path / "raw", verify=False)
    with pytest.raises(ConversionError, match="does not exist"):
        convert_cvc_clinicdb(tmp_path / "nowhere", tmp_path / "raw", verify=False)


def test_jpeg_frames_of_a_resized_mirror_convert(tmp_path):
    root = tmp_path / "cvc_clinicdb_256"
    (root / "Original").mkdir(parents=True)
    (root / "Ground Truth").mkdir()
    rng = np.random.default_rng(0)
    frames = [f for f in range(1, 15) if f not in (3, 11)]  # frames may be missing from a mirror
    for frame in frames:
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / "Original" / f"{frame}.jpg")
        mask = np.zeros((16, 16), np.uint8)
        mask[4:10, 5:12] = 255
        Image.fromarray(mask).save(root / "Ground Truth" / f"{frame}.png")
    dest = convert_cvc_clinicdb(root, tmp_path / "raw", num_workers=1, verify=False)
    record = json.loads((dest / "conversion_split.json").read_text())
    assert sorted(record["train"] + record["val"] + record["test"]) == [f"cvc_{f:04d}" for f in frames]
    label = np.asarray(Image.open(next((dest / "labelsTr").iterdir())))
    assert set(np.unique(label)) == {0, 1} and label[4:10, 5:12].all()
    assert Image.open(next((dest / "imagesTr").iterdir())).mode == "RGB"


def test_overwrite_refuses_an_input_inside_the_dataset_it_replaces(tmp_path, capsys):
    dest = tmp_path / "raw" / "Dataset804_CVCClinicDB"
    make_cvc(dest / "download")
    before = sorted(p.relative_to(dest) for p in dest.rglob("*"))
    code = main(["-i", str(dest / "download"), "-o", str(tmp_path / "raw"), "--overwrite", "-np", "1", "--no-verify"])
    err = capsys.readouterr().err
    assert code == 1 and "lies inside the dataset folder" in err and "Traceback" not in err
    assert sorted(p.relative_to(dest) for p in dest.rglob("*")) == before
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["Dataset804_CVCClinicDB"]


def test_python_api_takes_str_paths(tmp_path):
    make_cvc(tmp_path / "download", frames=10)
    dest = convert_cvc_clinicdb(str(tmp_path / "download"), str(tmp_path / "raw"), num_workers=1, verify=False)
    assert dest == tmp_path / "raw" / "Dataset804_CVCClinicDB" and (dest / "dataset.json").is_file()


def test_sigterm_leaves_no_partial_folder(tmp_path):
    make_cvc(tmp_path / "download", frames=10)
    raw = tmp_path / "raw"
    raw.mkdir()
    # nnU-Net's verification runs for seconds inside the build folder: the kill lands while it exists
    command = [sys.executable, "-m", "dataset_conversion.cvc_clinicdb", "-i", str(tmp_path / "download"),
               "-o", str(raw), "-np", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               cwd=Path(__file__).resolve().parents[1])
    deadline = time.time() + 60
    while not any(p.name.startswith(".Dataset804_CVCClinicDB.partial-") for p in raw.iterdir()):
        assert process.poll() is None and time.time() < deadline, process.communicate()
        time.sleep(0.02)
    time.sleep(0.2)
    os.kill(process.pid, signal.SIGTERM)
    process.communicate(timeout=60)
    assert process.returncode != 0
    assert list(raw.iterdir()) == []


# ------------------------------------------------------------------------------------------ split by video

def test_sequence_table_covers_all_612_frames_once():
    assert [sequence_of(f) for f in (1, 25, 26, 200, 205, 206, 478, 479, 591, 592, 612)] == \
        [1, 1, 2, 10, 10, 11, 23, 24, 28, 29, 29]
    assert sum(last - first + 1 for first, last in SEQUENCE_FRAMES) == 612 and len(SEQUENCE_FRAMES) == 29
    with pytest.raises(ValueError):
        sequence_of(613)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_video_split_keeps_every_sequence_in_one_part(seed):
    # the 256 x 256 mirror lacks frames 133, 419 and 480
    frames = {f"cvc_{f:04d}": f for f in range(1, 613) if f not in (133, 419, 480)}
    train, val, test, sequences = cvc_video_split(frames, seed)
    assert sorted(train + val + test) == sorted(frames)
    parts = {name: {sequence_of(frames[c]) for c in cases} for name, cases in
             (("train", train), ("val", val), ("test", test))}
    assert parts == {name: set(seqs) for name, seqs in sequences.items()}
    assert not (parts["train"] & parts["val"] or parts["train"] & parts["test"] or parts["val"] & parts["test"])
    for held_out in (val, test):
        assert 40 <= len(held_out) <= 85  # about 10 % of 609 frames, in whole sequences of 6-26 frames
    assert cvc_video_split(dict(reversed(list(frames.items()))), seed) == (train, val, test, sequences)
    assert cvc_video_split(frames, seed + 10)[2] != test


def test_video_split_end_to_end_records_sequences(tmp_path, capsys):
    make_cvc(tmp_path / "download", frames=80)  # sequences 1-5 (frames 79-80 of sequence 5)
    assert main(["-i", str(tmp_path / "download"), "-o", str(tmp_path / "raw"), "--split", "video", "--seed", "3",
                 "-np", "1", "--no-verify"]) == 0
    dest = tmp_path / "raw" / "Dataset804_CVCClinicDB"
    record = json.loads((dest / "conversion_split.json").read_text())
    (fold,) = json.loads((dest / "splits_final.json").read_text())
    assert (record["split"], record["seed"]) == ("video", 3)
    assert (fold["train"], fold["val"]) == (record["train"], record["val"])
    for part in ("train", "val", "test"):
        assert {sequence_of(int(c[4:])) for c in record[part]} == set(record["sequences"][part])
    assert sorted(sum(record["sequences"].values(), [])) == [1, 2, 3, 4, 5]
    assert _ids(dest / "imagesTs", "_0000.png") == record["test"]
    assert json.loads((dest / "dataset.json").read_text())["conversion"]["split"].startswith("seeded, whole video")


def test_video_split_refuses_frames_outside_the_table(tmp_path):
    make_cvc(tmp_path / "download", frames=20)
    for folder in ("Original", "Ground Truth"):
        (tmp_path / "download" / folder / "7.tif").rename(tmp_path / "download" / folder / "700.tif")
    with pytest.raises(ConversionError, match="frame 700 is not in CVC-ClinicDB's frame -> video table"):
        convert_cvc_clinicdb(tmp_path / "download", tmp_path / "raw", split="video", verify=False)
    make_cvc(tmp_path / "one_video", frames=20)  # all of sequence 1
    with pytest.raises(ConversionError, match="at least 3 sequences.*--split random"):
        convert_cvc_clinicdb(tmp_path / "one_video", tmp_path / "raw", split="video", verify=False)
    assert not (tmp_path / "raw").exists()
