"""Synapse converter, end to end on tiny synthetic copies of the raw BTCV and TransUNet releases."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import SimpleITK as sitk

from dataset_conversion.common import ConversionError
from dataset_conversion.synapse import convert_synapse, main

TEST = ["0001", "0002", "0003", "0004", "0008", "0022", "0025", "0029", "0032", "0035", "0036", "0038"]
TRAIN = ["0005", "0006", "0007", "0009", "0010", "0021", "0023", "0024", "0026", "0027", "0028", "0030",
         "0031", "0033", "0034", "0037", "0039", "0040"]
# DESIGN.md section 6: TransUNet's organ order by raw BTCV label
RAW_TO_TRANSUNET = {8: 1, 4: 2, 3: 3, 2: 4, 6: 5, 11: 6, 1: 7, 7: 8}
SPACING = (0.75, 0.8, 3.0)
ORIGIN = (-170.0, -160.0, -300.0)


def _write_volume(array: np.ndarray, path: Path, spacing=SPACING) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(ORIGIN)
    sitk.WriteImage(image, str(path), useCompression=True)


def make_raw_btcv(root: Path, max_label: int = 13, depth: int = 3) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """RawData/RawData/Training/{img,label} (a mirror's extra level) plus an unlabelled Testing/img."""
    rng = np.random.default_rng(1)
    training = root / "RawData" / "RawData" / "Training"
    (training / "img").mkdir(parents=True)
    (training / "label").mkdir()
    testing = root / "RawData" / "RawData" / "Testing" / "img"
    testing.mkdir(parents=True)
    _write_volume(np.zeros((depth, 6, 5), np.int16), testing / "img0061.nii.gz")
    cases = {}
    for number in TRAIN + TEST:
        image = rng.integers(-1024, 2000, size=(depth, 6, 5)).astype(np.int16)
        label = rng.integers(0, max_label + 1, size=(depth, 6, 5)).astype(np.uint8)
        _write_volume(image, training / "img" / f"img{number}.nii.gz")
        _write_volume(label, training / "label" / f"label{number}.nii.gz")
        cases[number] = (image, label)
    return cases


def make_transunet(root: Path, depths: dict[str, int] | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """train_npz/caseXXXX_sliceYYY.npz and test_vol_h5/caseXXXX.npy.h5 in TransUNet's keys and dtypes."""
    rng = np.random.default_rng(2)
    (root / "train_npz").mkdir(parents=True)
    (root / "test_vol_h5").mkdir()
    cases = {}
    for i, number in enumerate(TRAIN + TEST):
        depth = depths[number] if depths else 2 + i % 3
        image = rng.random((depth, 8, 7), dtype=np.float32)
        label = rng.integers(0, 9, size=(depth, 8, 7)).astype(np.float32)
        if number in TRAIN:
            for s in range(depth):
                np.savez(root / "train_npz" / f"case{number}_slice{s:03d}.npz", image=image[s], label=label[s])
        else:
            with h5py.File(root / "test_vol_h5" / f"case{number}.npy.h5", "w") as f:
                f["image"], f["label"] = image, label
        cases[number] = (image, label)
    return cases


def _read(path: Path) -> tuple[np.ndarray, sitk.Image]:
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), image


def _case_ids(folder: Path, suffix: str) -> list[str]:
    return sorted(p.name[: -len(suffix)] for p in folder.iterdir())


def test_raw_release_remaps_to_transunet_organs_voxel_exactly(tmp_path):
    cases = make_raw_btcv(tmp_path / "download")
    dest = convert_synapse(tmp_path / "download", tmp_path / "raw", num_workers=1, verify=True)

    assert dest == tmp_path / "raw" / "Dataset801_Synapse"
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["Dataset801_Synapse"]
    assert _case_ids(dest / "imagesTr", "_0000.nii.gz") == [f"case{n}" for n in TRAIN]
    assert _case_ids(dest / "labelsTr", ".nii.gz") == [f"case{n}" for n in TRAIN]
    assert _case_ids(dest / "imagesTs", "_0000.nii.gz") == [f"case{n}" for n in sorted(TEST)]
    assert _case_ids(dest / "labelsTs", ".nii.gz") == [f"case{n}" for n in sorted(TEST)]
    assert not (dest / "splits_final.json").exists()
    for number, (image, label) in cases.items():
        part = "Tr" if number in TRAIN else "Ts"
        out_image, geometry = _read(dest / f"images{part}" / f"case{number}_0000.nii.gz")
        out_label, label_geometry = _read(dest / f"labels{part}" / f"case{number}.nii.gz")
        np.testing.assert_array_equal(out_image, image)
        expected = np.zeros_like(label)
        for raw_value, organ in RAW_TO_TRANSUNET.items():
            expected[label == raw_value] = organ
        np.testing.assert_array_equal(out_label, expected)
        for volume in (geometry, label_geometry):
            np.testing.assert_allclose(volume.GetSpacing(), SPACING)
            np.testing.assert_allclose(volume.GetOrigin(), ORIGIN)
    dataset = json.loads((dest / "dataset.json").read_text())
    assert dataset["channel_names"] == {"0": "CT"}
    assert dataset["labels"] == {"background": 0, "aorta": 1, "gallbladder": 2, "kidney_left": 3, "kidney_right": 4,
                                 "liver": 5, "pancreas": 6, "spleen": 7, "stomach": 8}
    assert dataset["numTraining"] == 18 and dataset["file_ending"] == ".nii.gz"


def test_transunet_release_restacks_slices_with_unit_spacing_and_no_ct_clipping(tmp_path, capsys):
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import ZScoreNormalization
    from nnunetv2.preprocessing.normalization.map_channel_name_to_normalization import get_normalization_scheme

    cases = make_transunet(tmp_path / "data" / "Synapse")
    dest = convert_synapse(tmp_path / "data", tmp_path / "raw", num_workers=1, verify=True)

    assert "1 x 1 x 1 mm" in capsys.readouterr().err
    for number, (image, label) in cases.items():
        part = "Tr" if number in TRAIN else "Ts"
        out_image, geometry = _read(dest / f"images{part}" / f"case{number}_0000.nii.gz")
        out_label, _ = _read(dest / f"labels{part}" / f"case{number}.nii.gz")
        np.testing.assert_array_equal(out_image, image)
        np.testing.assert_array_equal(out_label, label.astype(np.uint8))
        assert geometry.GetSpacing() == (1.0, 1.0, 1.0)
    channel = json.loads((dest / "dataset.json").read_text())["channel_names"]["0"]
    assert get_normalization_scheme(channel) is ZScoreNormalization


def test_transunet_release_borrows_spacing_from_the_raw_release(tmp_path):
    make_raw_btcv(tmp_path / "btcv", depth=3)
    make_transunet(tmp_path / "transunet", depths={n: 3 for n in TRAIN + TEST})
    dest = convert_synapse(tmp_path / "transunet", tmp_path / "raw", spacing_from=tmp_path / "btcv", num_workers=1,
                           verify=False)
    for path in [dest / "imagesTr" / "case0005_0000.nii.gz", dest / "labelsTs" / "case0001.nii.gz"]:
        np.testing.assert_allclose(sitk.ReadImage(str(path)).GetSpacing(), SPACING)

    make_transunet(tmp_path / "other", depths={n: 4 for n in TRAIN + TEST})
    with pytest.raises(ConversionError, match=r"case0005_slice000\.npz: this case has 4 slices but .*img0005"):
        convert_synapse(tmp_path / "other", tmp_path / "raw2", spacing_from=tmp_path / "btcv", num_workers=1,
                        verify=False)
    assert not (tmp_path / "raw2").exists()


def test_release_in_8_organ_order_is_refused_unless_a_map_is_given(tmp_path):
    cases = make_raw_btcv(tmp_path / "download", max_label=8)
    with pytest.raises(ConversionError, match="no label volume holds a raw BTCV label above 8.*--label-map"):
        convert_synapse(tmp_path / "download", tmp_path / "raw", num_workers=1, verify=False)
    assert not (tmp_path / "raw").exists()

    reverse = {src: 9 - src for src in range(1, 9)}
    dest = convert_synapse(tmp_path / "download", tmp_path / "raw", label_map=reverse, num_workers=1, verify=False)
    out, _ = _read(dest / "labelsTr" / "case0005.nii.gz")
    label = cases["0005"][1]
    np.testing.assert_array_equal(out, np.where(label > 0, 9 - label.astype(int), 0))


@pytest.mark.parametrize("text, message", [("8:1,4:2", r"produces no TransUNet label \[3, 4, 5, 6, 7, 8\]"),
                                           ("8:1,4:9,3:3,2:4,6:5,11:6,1:7,7:8", "targets \\[9\\]"),
                                           ("8-1", "not SRC:DST"),
                                           ("8:1,4:2,3:3,2:4,6:5,11:6,1:7,99999999999999999999:8",
                                            r"outside 1\.\.65535")])
def test_bad_label_maps_are_explained(tmp_path, capsys, text, message):
    make_raw_btcv(tmp_path / "download")
    assert main(["-i", str(tmp_path / "download"), "-o", str(tmp_path / "raw"), "--label-map", text]) == 1
    err = capsys.readouterr().err
    assert err.startswith("saumamba_convert_synapse: error: --label-map") and re.search(message, err)
    assert "Traceback" not in err


def _damage(root: Path, what: str) -> str:
    """Break one file of a raw BTCV copy; returns the file name the error must name."""
    training = root / "RawData" / "RawData" / "Training"
    if what == "missing label":
        (training / "label" / "label0007.nii.gz").unlink()
        return "img0007.nii.gz"
    if what == "orphan label":
        (training / "img" / "img0007.nii.gz").unlink()
        return "label0007.nii.gz"
    if what == "missing case":
        (training / "img" / "img0040.nii.gz").unlink()
        (training / "label" / "label0040.nii.gz").unlink()
        return "img0040.nii.gz"
    if what == "wrong label ID":
        _write_volume(np.full((3, 6, 5), 14, np.uint8), training / "label" / "label0009.nii.gz")
        return "label0009.nii.gz"
    if what == "size mismatch":
        _write_volume(np.zeros((3, 6, 4), np.uint8), training / "label" / "label0021.nii.gz")
        return "label0021.nii.gz"
    if what == "label shifted":
        label = sitk.ReadImage(str(training / "label" / "label0024.nii.gz"))
        label.SetOrigin((ORIGIN[0] + 2 * SPACING[0], *ORIGIN[1:]))
        sitk.WriteImage(label, str(training / "label" / "label0024.nii.gz"))
        return "label0024.nii.gz"
    if what == "label rotated":
        label = sitk.ReadImage(str(training / "label" / "label0026.nii.gz"))
        label.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, 1))
        sitk.WriteImage(label, str(training / "label" / "label0026.nii.gz"))
        return "label0026.nii.gz"
    if what == "truncated":
        path = training / "img" / "img0023.nii.gz"
        path.write_bytes(path.read_bytes()[:-40])  # header intact, data cut short: ITK alone would not notice
        return "img0023.nii.gz"
    raise ValueError(what)


@pytest.mark.parametrize("what", ["missing label", "orphan label", "missing case", "wrong label ID", "size mismatch",
                                  "label shifted", "label rotated", "truncated"])
def test_raw_release_errors_name_the_file_and_write_nothing(tmp_path, capsys, what):
    make_raw_btcv(tmp_path / "download")
    name = _damage(tmp_path / "download", what)
    code = main(["-i", str(tmp_path / "download"), "-o", str(tmp_path / "raw"), "-np", "1", "--no-verify"])
    err = capsys.readouterr().err
    assert code == 1 and name in err and "Traceback" not in err
    assert err.startswith("saumamba_convert_synapse: error: ")
    assert not (tmp_path / "raw").exists()  # not even the -o folder the run would have created


def _damage_transunet(root: Path, what: str) -> str:
    if what == "missing slice":
        (root / "train_npz" / "case0006_slice001.npz").unlink()
        return "case0006_slice001.npz"
    if what == "wrong keys":
        np.savez(root / "train_npz" / "case0007_slice000.npz", img=np.zeros((8, 7)), seg=np.zeros((8, 7)))
        return "case0007_slice000.npz"
    if what == "truncated npz":
        path = root / "train_npz" / "case0009_slice000.npz"
        path.write_bytes(path.read_bytes()[:100])
        return "case0009_slice000.npz"
    if what == "HU not scaled":
        with h5py.File(root / "test_vol_h5" / "case0002.npy.h5", "w") as f:
            f["image"], f["label"] = np.full((2, 8, 7), 300.0, np.float32), np.zeros((2, 8, 7), np.float32)
        return "case0002.npy.h5"
    if what == "wrong label ID":
        with h5py.File(root / "test_vol_h5" / "case0003.npy.h5", "w") as f:
            f["image"], f["label"] = np.zeros((2, 8, 7), np.float32), np.full((2, 8, 7), 9, np.float32)
        return "case0003.npy.h5"
    if what == "test case among training slices":
        np.savez(root / "train_npz" / "case0001_slice000.npz", image=np.zeros((8, 7)), label=np.zeros((8, 7)))
        return "case0001_slice000.npz"
    raise ValueError(what)


@pytest.mark.parametrize("what", ["missing slice", "wrong keys", "truncated npz", "HU not scaled", "wrong label ID",
                                  "test case among training slices"])
def test_transunet_release_errors_name_the_file_and_write_nothing(tmp_path, what):
    make_transunet(tmp_path / "download")
    name = _damage_transunet(tmp_path / "download", what)
    with pytest.raises(ConversionError, match=name.replace(".", r"\.")):
        convert_synapse(tmp_path / "download", tmp_path / "raw", num_workers=1, verify=False)
    assert not (tmp_path / "raw").exists()


def test_unknown_layout_is_refused(tmp_path):
    (tmp_path / "download" / "imagesTr").mkdir(parents=True)
    with pytest.raises(ConversionError, match="no Synapse release found.*RawData/Training"):
        convert_synapse(tmp_path / "download", tmp_path / "raw", verify=False)


@pytest.mark.slow
def test_converted_dataset_passes_nnunet_plan_and_preprocess(tmp_path):
    """`python -m` conversion, then the real nnUNetv2_plan_and_preprocess with --verify_dataset_integrity."""
    make_raw_btcv(tmp_path / "download", depth=8)
    env = {**os.environ, "nnUNet_raw": str(tmp_path / "nnUNet_raw"),
           "nnUNet_preprocessed": str(tmp_path / "nnUNet_preprocessed"),
           "nnUNet_results": str(tmp_path / "nnUNet_results")}
    convert = subprocess.run([sys.executable, "-m", "dataset_conversion.synapse", "-i", str(tmp_path / "download"),
                              "-d", "977", "-np", "1", "--no-verify"], env=env, capture_output=True, text=True,
                             timeout=120)
    assert convert.returncode == 0, convert.stderr
    tool = shutil.which("nnUNetv2_plan_and_preprocess", path=str(Path(sys.executable).parent)) \
        or shutil.which("nnUNetv2_plan_and_preprocess")
    assert tool, "nnUNetv2_plan_and_preprocess is not installed"
    plan = subprocess.run([tool, "-d", "977", "-c", "3d_fullres", "-np", "1", "-npfp", "1",
                           "--verify_dataset_integrity"], env=env, capture_output=True, text=True, timeout=300)
    assert plan.returncode == 0, plan.stdout[-3000:] + plan.stderr[-3000:]

    preprocessed = tmp_path / "nnUNet_preprocessed" / "Dataset977_Synapse"
    configuration = json.loads((preprocessed / "nnUNetPlans.json").read_text())["configurations"]["3d_fullres"]
    assert configuration["normalization_schemes"] == ["CTNormalization"]
    np.testing.assert_allclose(configuration["spacing"], SPACING[::-1], rtol=1e-6)
    cases = {p.name[: -len(".b2nd")] for p in (preprocessed / "nnUNetPlans_3d_fullres").glob("*.b2nd")
             if not p.name.endswith("_seg.b2nd")}
    assert cases == {f"case{n}" for n in TRAIN}


def test_python_api_takes_str_paths(tmp_path):
    make_raw_btcv(tmp_path / "btcv", depth=3)
    make_transunet(tmp_path / "transunet", depths={n: 3 for n in TRAIN + TEST})
    dest = convert_synapse(str(tmp_path / "transunet"), str(tmp_path / "raw"), spacing_from=str(tmp_path / "btcv"),
                           num_workers=1, verify=False)
    np.testing.assert_allclose(sitk.ReadImage(str(dest / "imagesTr" / "case0005_0000.nii.gz")).GetSpacing(), SPACING)
