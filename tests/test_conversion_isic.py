"""ISIC 2017 / 2018 converter, end to end on tiny synthetic copies of the official and VM-UNet layouts."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataset_conversion.common import ConversionError
from dataset_conversion.isic import convert_isic, main_2017, main_2018

FOLDERS = {
    2017: {"train": ("ISIC-2017_Training_Data", "ISIC-2017_Training_Part1_GroundTruth"),
           "val": ("ISIC-2017_Validation_Data", "ISIC-2017_Validation_Part1_GroundTruth"),
           "test": ("ISIC-2017_Test_v2_Data", "ISIC-2017_Test_v2_Part1_GroundTruth")},
    2018: {"train": ("ISIC2018_Task1-2_Training_Input", "ISIC2018_Task1_Training_GroundTruth"),
           "val": ("ISIC2018_Task1-2_Validation_Input", "ISIC2018_Task1_Validation_GroundTruth"),
           "test": ("ISIC2018_Task1-2_Test_Input", "ISIC2018_Task1_Test_GroundTruth")},
}


def _lesion(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
    mask[top: top + height // 2, left: left + width // 2] = 255
    return mask


def make_official(root: Path, year: int, counts=(7, 3, 3)) -> dict[str, tuple[np.ndarray, np.ndarray, str]]:
    """Official folders with JPEG images of varying size, {0, 255} PNG masks, and the side files the
    releases ship (superpixels and metadata in 2017, licence and attribution texts in 2018).
    Returns {ISIC ID: (decoded RGB, mask, part)}."""
    rng = np.random.default_rng(year)
    cases, number = {}, 0
    for part, count in zip(("train", "val", "test"), counts, strict=True):
        image_dir, mask_dir = (root / name for name in FOLDERS[year][part])
        image_dir.mkdir(parents=True)
        mask_dir.mkdir()
        for _ in range(count):
            case_id = f"ISIC_{number:07d}"
            height, width = 16 + number % 3, 20 + 2 * (number % 4)
            Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(
                image_dir / f"{case_id}.jpg", quality=90)
            mask = _lesion(height, width, rng)
            Image.fromarray(mask).save(mask_dir / f"{case_id}_segmentation.png")
            if year == 2017:
                Image.fromarray(np.zeros((height, width, 3), np.uint8)).save(image_dir / f"{case_id}_superpixels.png")
            cases[case_id] = (np.asarray(Image.open(image_dir / f"{case_id}.jpg").convert("RGB")), mask, part)
            number += 1
        if year == 2017:
            (image_dir / f"{image_dir.name}_metadata.csv").write_text("image_id,age_approximate,sex\n")
        else:
            for folder in (image_dir, mask_dir):
                (folder / "LICENSE.txt").write_text("CC-BY-NC")
                (folder / "ATTRIBUTION.txt").write_text("ISIC")
    return cases


def make_archive(root: Path, counts=(6, 3)) -> dict[str, tuple[np.ndarray, np.ndarray, str]]:
    """VM-UNet's archive: isic17/{train,val}/{images,masks}/ISIC_XXXXXXX.png."""
    rng = np.random.default_rng(7)
    cases, number = {}, 0
    for part, count in zip(("train", "val"), counts, strict=True):
        (root / "isic17" / part / "images").mkdir(parents=True)
        (root / "isic17" / part / "masks").mkdir()
        for _ in range(count):
            case_id = f"ISIC_{number:07d}"
            rgb = rng.integers(0, 256, (18, 24, 3), dtype=np.uint8)
            mask = _lesion(18, 24, rng)
            Image.fromarray(rgb).save(root / "isic17" / part / "images" / f"{case_id}.png")
            Image.fromarray(mask).save(root / "isic17" / part / "masks" / f"{case_id}.png")
            cases[case_id] = (rgb, mask, part)
            number += 1
    return cases


def _ids(folder: Path, suffix: str) -> list[str]:
    return sorted(p.name[: -len(suffix)] for p in folder.iterdir())


def _check_case(dest: Path, part: str, case_id: str, rgb: np.ndarray, mask: np.ndarray) -> None:
    image = Image.open(dest / f"images{part}" / f"{case_id}_0000.png")
    label = Image.open(dest / f"labels{part}" / f"{case_id}.png")
    assert image.mode == "RGB" and label.mode == "L"
    np.testing.assert_array_equal(np.asarray(image), rgb)
    np.testing.assert_array_equal(np.asarray(label), mask // 255)


def test_official_2017_split_keeps_pixels_and_fixes_the_validation_fold(tmp_path):
    cases = make_official(tmp_path / "download", 2017)
    # an archive extracted into a folder of its own name
    test_images = tmp_path / "download" / FOLDERS[2017]["test"][0]
    test_images.rename(tmp_path / "tmp")
    test_images.mkdir()
    (tmp_path / "tmp").rename(test_images / test_images.name)
    dest = convert_isic(2017, tmp_path / "download", tmp_path / "raw", split="official", num_workers=1, verify=True)

    assert dest.name == "Dataset802_ISIC2017"
    by_part = {p: sorted(c for c, v in cases.items() if v[2] == p) for p in ("train", "val", "test")}
    assert _ids(dest / "imagesTr", "_0000.png") == by_part["train"] + by_part["val"]
    assert _ids(dest / "imagesTs", "_0000.png") == _ids(dest / "labelsTs", ".png") == by_part["test"]
    for case_id, (rgb, mask, part) in cases.items():
        _check_case(dest, "Ts" if part == "test" else "Tr", case_id, rgb, mask)
    assert json.loads((dest / "splits_final.json").read_text()) == [{"train": by_part["train"],
                                                                      "val": by_part["val"]}]
    dataset = json.loads((dest / "dataset.json").read_text())
    assert dataset["channel_names"] == {"0": "R", "1": "G", "2": "B"}
    assert dataset["labels"] == {"background": 0, "lesion": 1}
    assert dataset["numTraining"] == 10 and dataset["file_ending"] == ".png"


def test_7_3_split_is_seeded_reproducible_and_uses_train_plus_val(tmp_path):
    cases = make_official(tmp_path / "download", 2018, counts=(14, 6, 2))
    pool = {c for c, v in cases.items() if v[2] != "test"}
    first = convert_isic(2018, tmp_path / "download", tmp_path / "a", num_workers=2, verify=False)  # default 7:3
    again = convert_isic(2018, tmp_path / "download", tmp_path / "b", num_workers=1, verify=False)
    other = convert_isic(2018, tmp_path / "download", tmp_path / "c", seed=1, num_workers=1, verify=False)

    assert first.name == "Dataset803_ISIC2018"
    train, test = set(_ids(first / "imagesTr", "_0000.png")), set(_ids(first / "imagesTs", "_0000.png"))
    assert (len(train), len(test)) == (14, 6) and train | test == pool and not train & test
    assert _ids(again / "imagesTs", "_0000.png") == sorted(test)
    assert _ids(other / "imagesTs", "_0000.png") != sorted(test)
    record = json.loads((first / "conversion_split.json").read_text())
    assert (record["split"], record["seed"], set(record["test"])) == ("7:3", 0, test)
    assert not (first / "splits_final.json").exists()
    for case_id in train:
        _check_case(first, "Tr", case_id, cases[case_id][0], cases[case_id][1])


def test_vmunet_archive_keeps_its_split_and_resizes_bilinear_and_nearest(tmp_path):
    cases = make_archive(tmp_path / "data")
    dest = convert_isic(2017, tmp_path / "data", tmp_path / "raw", resize=8, num_workers=1, verify=False)

    assert _ids(dest / "imagesTr", "_0000.png") == sorted(c for c, v in cases.items() if v[2] == "train")
    assert _ids(dest / "imagesTs", "_0000.png") == sorted(c for c, v in cases.items() if v[2] == "val")
    for case_id, (rgb, mask, part) in cases.items():
        side = "Tr" if part == "train" else "Ts"
        image = np.asarray(Image.open(dest / f"images{side}" / f"{case_id}_0000.png"))
        label = np.asarray(Image.open(dest / f"labels{side}" / f"{case_id}.png"))
        assert image.shape == (8, 8, 3) and label.shape == (8, 8)
        np.testing.assert_array_equal(image, np.asarray(Image.fromarray(rgb).resize((8, 8), Image.BILINEAR)))
        np.testing.assert_array_equal(label, np.asarray(Image.fromarray(mask).resize((8, 8), Image.NEAREST)) // 255)
    with pytest.raises(ConversionError, match="no official test set"):
        convert_isic(2017, tmp_path / "data", tmp_path / "raw2", split="official", verify=False)


def _damage(root: Path, what: str) -> str:
    """Break the official 2017 copy; returns the file or folder name the error must name."""
    train_images, train_masks = (root / n for n in FOLDERS[2017]["train"])
    if what == "image without mask":
        (train_masks / "ISIC_0000002_segmentation.png").unlink()
        return "ISIC_0000002.jpg"
    if what == "mask without image":
        (train_images / "ISIC_0000003.jpg").unlink()
        return "ISIC_0000003_segmentation.png"
    if what == "grey mask values":
        Image.fromarray(np.full((16, 20), 128, np.uint8)).save(train_masks / "ISIC_0000000_segmentation.png")
        return "ISIC_0000000_segmentation.png"
    if what == "size mismatch":
        Image.fromarray(np.zeros((30, 30), np.uint8)).save(train_masks / "ISIC_0000004_segmentation.png")
        return "ISIC_0000004_segmentation.png"
    if what == "truncated jpeg":
        path = train_images / "ISIC_0000005.jpg"
        path.write_bytes(path.read_bytes()[:-200])
        return "ISIC_0000005.jpg"
    if what == "missing validation":
        for folder in FOLDERS[2017]["val"]:
            for f in (root / folder).iterdir():
                f.unlink()
            (root / folder).rmdir()
        return "ISIC-2017_Validation_Data"
    if what == "stray file":
        (train_images / "ISIC_0000001 (copy).jpg").write_bytes(b"")
        return "ISIC_0000001 (copy).jpg"
    raise ValueError(what)


@pytest.mark.parametrize("what", ["image without mask", "mask without image", "grey mask values", "size mismatch",
                                  "truncated jpeg", "missing validation", "stray file"])
def test_errors_name_the_file_and_write_nothing(tmp_path, capsys, what):
    make_official(tmp_path / "download", 2017)
    name = _damage(tmp_path / "download", what)
    code = main_2017(["-i", str(tmp_path / "download"), "-o", str(tmp_path / "raw"), "-np", "1", "--no-verify"])
    err = capsys.readouterr().err
    assert code == 1 and name in err and "Traceback" not in err
    assert not (tmp_path / "raw").exists() or list((tmp_path / "raw").iterdir()) == []


def test_official_split_needs_the_test_set_and_existing_datasets_are_kept(tmp_path, capsys):
    make_official(tmp_path / "download", 2018, counts=(4, 2, 0))
    for folder in FOLDERS[2018]["test"]:
        for f in (tmp_path / "download" / folder).iterdir():
            f.unlink()
        (tmp_path / "download" / folder).rmdir()
    args = ["-i", str(tmp_path / "download"), "-o", str(tmp_path / "raw"), "-np", "1", "--no-verify"]
    assert main_2018(args + ["--split", "official"]) == 1
    assert "ISIC2018_Task1-2_Test_Input is missing" in capsys.readouterr().err

    assert main_2018(args) == 0
    marker = sorted((tmp_path / "raw" / "Dataset803_ISIC2018" / "imagesTr").iterdir())[0]
    before = marker.read_bytes()
    assert main_2018(args + ["--resize", "4"]) == 1
    assert "--overwrite" in capsys.readouterr().err and marker.read_bytes() == before
    assert main_2018(args + ["--resize", "4", "--overwrite"]) == 0
    assert Image.open(marker).size == (4, 4)
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["Dataset803_ISIC2018"]
