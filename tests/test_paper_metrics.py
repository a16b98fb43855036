"""Tests of the paper's metrics (issue 5): hand-computable values, an independent HD95, folder I/O and errors."""
import json

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image
from scipy.ndimage import gaussian_filter
from scipy.spatial.distance import cdist

from nnunetv2_sa_umamba.evaluation.metrics import (
    confusion_counts,
    cvc_image_metrics,
    hd95,
    pooled_metrics,
    synapse_metrics,
)
from nnunetv2_sa_umamba.evaluation.paper_metrics import EvaluationError, evaluate_folders, main


def _box(shape, *ranges):
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(a, b) for a, b in ranges)] = True
    return mask


def _surface(mask):
    """Voxels of `mask` with a face neighbour outside it (or outside the array): 1-voxel-thick border."""
    padded = np.pad(mask, 1)
    inner = tuple(slice(1, -1) for _ in range(mask.ndim))
    interior = mask.copy()
    for axis in range(mask.ndim):
        for step in (-1, 1):
            interior &= np.roll(padded, step, axis=axis)[inner]
    return mask & ~interior


def _bruteforce_hd95(a, b, spacing):
    """HD95 from all pairwise surface distances: shares no code with medpy's distance transform."""
    points_a = np.argwhere(_surface(a)) * np.asarray(spacing)
    points_b = np.argwhere(_surface(b)) * np.asarray(spacing)
    distances = cdist(points_a, points_b)
    return float(np.percentile(np.concatenate([distances.min(axis=1), distances.min(axis=0)]), 95))


def _random_blob(rng, shape):
    return gaussian_filter(rng.random(shape), sigma=1.5) > 0.52


# --- metric functions -------------------------------------------------------------------------------------------

def test_confusion_counts_of_known_masks():
    pred = _box((4, 5), (0, 2), (0, 3))  # 6 pixels
    ref = _box((4, 5), (1, 3), (1, 5))  # 8 pixels, overlap rows 1, cols 1-2
    assert confusion_counts(pred, ref) == (2, 4, 6, 8)


def test_pooled_metrics_of_known_counts():
    metrics = pooled_metrics(tp=30, fp=10, fn=20, tn=40)
    assert metrics == pytest.approx({"mIoU": 0.5, "DSC": 2 / 3, "Acc": 0.7, "Spe": 0.8, "Sen": 0.6})
    # VM-UNet counts an undefined ratio as 0: no foreground anywhere
    assert pooled_metrics(0, 0, 0, 50) == {"mIoU": 0.0, "DSC": 0.0, "Acc": 1.0, "Spe": 1.0, "Sen": 0.0}


def test_cvc_image_metrics_use_smoothing_one():
    metrics = cvc_image_metrics(tp=3, fp=1, fn=2, tn=10)
    assert metrics == pytest.approx({"IoU": 4 / 7, "Dice": 7 / 10, "Acc": 13 / 16, "Precision": 3 / 4,
                                     "Recall": 3 / 5})
    # both masks empty: smoothing makes IoU and Dice 1, precision and recall are undefined -> 0
    assert cvc_image_metrics(0, 0, 0, 16) == {"IoU": 1.0, "Dice": 1.0, "Acc": 1.0, "Precision": 0.0,
                                               "Recall": 0.0}


# Shifting a box by s voxels along an axis of spacing h puts its whole trailing face s*h away from the other
# box's surface; those faces are more than 5% of the pooled surface distances, so HD95 = s*h exactly.
@pytest.mark.parametrize("shift_axis, spacing, expected", [
    (0, None, 2.0), (0, (2.0, 1.0, 1.0), 4.0), (1, (2.0, 1.0, 1.0), 2.0), (2, (1.0, 1.0, 0.5), 1.0),
])
def test_hd95_of_shifted_cube(shift_axis, spacing, expected):
    cube = _box((12, 12, 12), (2, 6), (2, 6), (2, 6))
    shifted = np.roll(cube, 2, axis=shift_axis)
    assert hd95(cube, shifted, spacing) == pytest.approx(expected)
    assert hd95(shifted, cube, spacing) == pytest.approx(expected)


@pytest.mark.parametrize("spacing, expected", [(None, 3.0), ((0.5, 2.0), 6.0)])
def test_hd95_of_shifted_square(spacing, expected):
    square = _box((20, 20), (4, 10), (4, 10))
    assert hd95(square, np.roll(square, 3, axis=1), spacing) == pytest.approx(expected)


def test_hd95_needs_non_empty_masks():
    with pytest.raises(ValueError, match="empty-mask rules"):
        hd95(np.zeros((4, 4), bool), _box((4, 4), (1, 2), (1, 2)))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("shape, spacing", [((14, 16, 12), None), ((14, 16, 12), (2.5, 0.7, 0.9)),
                                            ((24, 20), (0.6, 1.3))])
def test_hd95_agrees_with_bruteforce_distances_on_random_shapes(seed, shape, spacing):
    medpy_hd95 = pytest.importorskip("medpy.metric.binary").hd95
    rng = np.random.default_rng(seed)
    a, b = _random_blob(rng, shape), _random_blob(rng, shape)
    assert a.any() and b.any()
    unit = spacing or (1.0,) * len(shape)
    ours = hd95(a, b, spacing)
    assert ours == pytest.approx(_bruteforce_hd95(a, b, unit), rel=1e-9)
    # cropping to the joint bounding box must not change medpy's value on the full arrays
    assert ours == pytest.approx(medpy_hd95(a, b, voxelspacing=spacing), rel=1e-12)


def test_hd95_crop_is_exact_for_objects_touching_the_border():
    medpy_hd95 = pytest.importorskip("medpy.metric.binary").hd95
    a = _box((10, 10, 10), (0, 4), (3, 10), (2, 5))
    b = _box((10, 10, 10), (1, 6), (6, 10), (0, 3))
    assert hd95(a, b, (1.5, 1.0, 0.5)) == pytest.approx(medpy_hd95(a, b, voxelspacing=(1.5, 1.0, 0.5)))
    assert hd95(a, b) == pytest.approx(_bruteforce_hd95(a, b, (1.0, 1.0, 1.0)))


@pytest.mark.parametrize("pred_present, ref_present, dice, rule", [
    (False, True, 0.0, "pred_empty"),
    (True, False, 1.0, "ref_empty"),
    (False, False, 0.0, "pred_empty"),
])
def test_synapse_empty_mask_rules(pred_present, ref_present, dice, rule):
    cube = _box((8, 8, 8), (2, 5), (2, 5), (2, 5))
    empty = np.zeros_like(cube)
    metrics = synapse_metrics(cube if pred_present else empty, cube if ref_present else empty, (2.0, 1.0, 1.0))
    assert (metrics["Dice"], metrics["HD95"], metrics["HD95_mm"], metrics["rule"]) == (dice, 0.0, 0.0, rule)


def test_synapse_metrics_of_overlapping_cubes():
    cube = _box((12, 12, 12), (2, 6), (2, 6), (2, 6))
    metrics = synapse_metrics(np.roll(cube, 2, axis=0), cube, (3.0, 1.0, 1.0))
    assert metrics == pytest.approx({"Dice": 0.5, "HD95": 2.0, "HD95_mm": 6.0, "rule": "both_present",
                                     "n_pred": 64, "n_ref": 64})


# --- folders ----------------------------------------------------------------------------------------------------

def _write_nifti(path, array, spacing_xyz):
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.SetSpacing(spacing_xyz)
    sitk.WriteImage(image, str(path))


def _write_png(path, array):
    Image.fromarray(array.astype(np.uint8)).save(path)


def _dataset_json(path, labels, file_ending):
    path.write_text(json.dumps({"channel_names": {"0": "x"}, "labels": labels, "numTraining": 0,
                                "file_ending": file_ending}))


def _folders(tmp_path):
    ref, pred = tmp_path / "labelsTs", tmp_path / "pred"
    ref.mkdir()
    pred.mkdir()
    return ref, pred


def test_synapse_folders_follow_transunet_rules_and_spacing(tmp_path):
    ref, pred = _folders(tmp_path)
    _dataset_json(pred / "dataset.json", {"background": 0, "liver": 1, "kidney": 2}, ".nii.gz")
    organ1 = _box((12, 14, 14), (1, 5), (1, 5), (1, 5)).astype(np.uint8)
    organ2 = _box((12, 14, 14), (4, 8), (8, 12), (8, 12)).astype(np.uint8) * 2
    spacing_xyz = (0.8, 0.8, 2.5)  # SimpleITK order; array axis 0 (z) has spacing 2.5
    # case a: liver perfect; kidney shifted 2 slices along z -> Dice 0.5, HD95 2 voxels = 5 mm
    _write_nifti(ref / "a.nii.gz", organ1 + organ2, spacing_xyz)
    _write_nifti(pred / "a.nii.gz", organ1 + np.roll(organ2, 2, axis=0), spacing_xyz)
    # case b: liver predicted but absent from the reference -> (1, 0); kidney missed -> (0, 0)
    _write_nifti(ref / "b.nii.gz", organ2, spacing_xyz)
    _write_nifti(pred / "b.nii.gz", organ1, spacing_xyz)

    result = evaluate_folders(str(ref), str(pred), "synapse", num_processes=2)

    summary = result["summary"]
    assert summary["per_label"]["liver"] == pytest.approx(
        {"label": 1, "Dice": 1.0, "HD95": 0.0, "HD95_mm": 0.0, "n_ref_empty": 1, "n_pred_empty": 0})
    assert summary["per_label"]["kidney"] == pytest.approx(
        {"label": 2, "Dice": 0.25, "HD95": 1.0, "HD95_mm": 2.5, "n_ref_empty": 0, "n_pred_empty": 1})
    assert (summary["Dice"], summary["HD95"], summary["HD95_mm"]) == pytest.approx((0.625, 0.5, 1.25))
    assert [case["metrics"]["liver"]["rule"] for case in result["metric_per_case"]] == ["both_present", "ref_empty"]
    saved = json.loads((pred / "paper_metrics_synapse.json").read_text())
    assert saved["summary"]["Dice"] == pytest.approx(0.625)
    table = (pred / "paper_metrics_synapse.md").read_text()
    assert "| kidney (2) | 25.00 | 1.00 | 2.50 |" in table
    assert "| 62.50 | 0.50 | 100.00 | 25.00 |" in table


def test_synapse_on_2d_files_uses_2d_surfaces_and_spacing(tmp_path):
    ref, pred = _folders(tmp_path)
    _dataset_json(pred / "dataset.json", {"background": 0, "organ": 1}, ".nii.gz")
    square = _box((20, 20), (4, 10), (4, 10))
    _write_nifti(ref / "a.nii.gz", square, (0.5, 2.0))  # x spacing 0.5 -> array axis 1
    _write_nifti(pred / "a.nii.gz", np.roll(square, 3, axis=1), (0.5, 2.0))

    metrics = evaluate_folders(str(ref), str(pred), "synapse", num_processes=1)["metric_per_case"][0]

    assert metrics["spacing"] == [2.0, 0.5]
    assert (metrics["metrics"]["organ"]["HD95"], metrics["metrics"]["organ"]["HD95_mm"]) == (3.0, 1.5)


def _binary_cases(ref, pred, label=1):
    """Two 10x10 cases with counts (TP, FP, FN, TN) = (8, 0, 8, 84) and (4, 21, 0, 75)."""
    ref_a, pred_a = _box((10, 10), (0, 4), (0, 4)), _box((10, 10), (0, 2), (0, 4))
    ref_b, pred_b = _box((10, 10), (5, 7), (5, 7)), _box((10, 10), (5, 10), (5, 10))
    for folder, a, b in ((ref, ref_a, ref_b), (pred, pred_a, pred_b)):
        _write_png(folder / "a.png", a * label)
        _write_png(folder / "b.png", b * label)


def test_isic_pools_one_confusion_matrix(tmp_path):
    ref, pred = _folders(tmp_path)
    _dataset_json(tmp_path / "dataset.json", {"background": 0, "lesion": 1}, ".png")  # the reference's parent
    _binary_cases(ref, pred)

    summary = evaluate_folders(str(ref), str(pred), "isic", num_processes=1)["summary"]

    # pooled counts (12, 21, 8, 159): mIoU 12/41, not the mean of the per-image IoUs 8/16 and 4/25
    assert summary == pytest.approx({"TP": 12, "FP": 21, "FN": 8, "TN": 159, "mIoU": 12 / 41, "DSC": 24 / 53,
                                     "Acc": 171 / 200, "Spe": 159 / 180, "Sen": 12 / 20})
    assert (pred / "paper_metrics_isic.md").read_text().startswith("ISIC (VM-UNet protocol)")


def test_cvc_averages_per_image_metrics(tmp_path):
    ref, pred = _folders(tmp_path)
    _dataset_json(pred / "dataset.json", {"background": 0, "polyp": 1}, ".png")
    _binary_cases(ref, pred)

    summary = evaluate_folders(str(ref), str(pred), "cvc", num_processes=1)["summary"]

    iou = [(8 + 1) / (16 + 1), (4 + 1) / (25 + 1)]
    dice = [(16 + 1) / (24 + 1), (8 + 1) / (29 + 1)]
    assert summary["mean"] == pytest.approx({"IoU": np.mean(iou), "Dice": np.mean(dice), "Acc": (92 + 79) / 200,
                                             "Precision": (1 + 4 / 25) / 2, "Recall": (0.5 + 1) / 2})
    assert summary["std"]["IoU"] == pytest.approx(np.std(iou))


def test_binary_foreground_defaults_to_label_1_and_accepts_a_union(tmp_path):
    ref, pred = _folders(tmp_path)
    _dataset_json(pred / "dataset.json", {"background": 0, "polyp": 1, "other": 2}, ".png")
    _write_png(ref / "a.png", _box((6, 6), (0, 2), (0, 6)) * 1 + _box((6, 6), (4, 6), (0, 6)) * 2)
    _write_png(pred / "a.png", _box((6, 6), (0, 2), (0, 6)) * 2 + _box((6, 6), (4, 6), (0, 6)) * 2)

    label1 = evaluate_folders(str(ref), str(pred), "isic", num_processes=1)
    union = evaluate_folders(str(ref), str(pred), "isic", labels=["polyp", "2"], num_processes=1)

    assert label1["labels"] == {"polyp": 1} and label1["summary"]["mIoU"] == 0.0
    assert union["labels"] == {"polyp": 1, "other": 2} and union["summary"]["mIoU"] == 1.0


def test_cli_prints_table_and_writes_output(tmp_path, capsys):
    ref, pred = _folders(tmp_path)
    _dataset_json(pred / "dataset.json", {"background": 0, "polyp": 1}, ".png")
    _binary_cases(ref, pred)
    out = tmp_path / "report" / "cvc.json"
    out.parent.mkdir()

    main([str(ref), str(pred), "--protocol", "cvc", "-np", "1", "-o", str(out)])

    printed = capsys.readouterr().out
    assert "| mean |" in printed and printed.strip() == (tmp_path / "report" / "cvc.md").read_text().strip()
    assert json.loads(out.read_text())["num_cases"] == 2


# --- bad input --------------------------------------------------------------------------------------------------

def _nifti_pair(tmp_path, cases=("a", "b")):
    ref, pred = _folders(tmp_path)
    _dataset_json(pred / "dataset.json", {"background": 0, "organ": 1}, ".nii.gz")
    organ = _box((6, 8, 8), (1, 4), (2, 5), (2, 6))
    for case in cases:
        _write_nifti(ref / f"{case}.nii.gz", organ, (1.0, 1.0, 2.0))
        _write_nifti(pred / f"{case}.nii.gz", organ, (1.0, 1.0, 2.0))
    return ref, pred


def _cli_error(argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    message = exit_info.value.code
    assert isinstance(message, str) and message.startswith("saumamba_evaluate: error:")  # exit status 1
    return message


def test_missing_prediction_is_an_error_unless_chill(tmp_path):
    ref, pred = _nifti_pair(tmp_path)
    (pred / "b.nii.gz").unlink()
    message = _cli_error([str(ref), str(pred), "--protocol", "synapse", "-np", "1"])
    assert str(pred) in message and "b" in message and "--chill" in message
    result = evaluate_folders(str(ref), str(pred), "synapse", num_processes=1, allow_missing=True)
    assert [case["case"] for case in result["metric_per_case"]] == ["a"]


def test_prediction_without_reference_is_an_error(tmp_path):
    ref, pred = _nifti_pair(tmp_path)
    (ref / "a.nii.gz").unlink()
    with pytest.raises(EvaluationError, match="prediction\\(s\\) without a reference.*: a\\."):
        evaluate_folders(str(ref), str(pred), "synapse", num_processes=1, allow_missing=True)


def test_shape_mismatch_names_both_files(tmp_path):
    ref, pred = _nifti_pair(tmp_path)
    _write_nifti(pred / "b.nii.gz", np.zeros((6, 8, 9)), (1.0, 1.0, 2.0))
    message = _cli_error([str(ref), str(pred), "--protocol", "isic", "-np", "1"])
    assert str(pred / "b.nii.gz") in message and str(ref / "b.nii.gz") in message and "shape" in message


def test_spacing_mismatch_is_an_error(tmp_path):
    ref, pred = _nifti_pair(tmp_path)
    _write_nifti(pred / "a.nii.gz", _box((6, 8, 8), (1, 4), (2, 5), (2, 6)), (1.0, 1.0, 3.0))
    with pytest.raises(EvaluationError, match="spacing"):
        evaluate_folders(str(ref), str(pred), "synapse", num_processes=1)


def test_label_values_absent_from_dataset_json_are_an_error(tmp_path):
    ref, pred = _nifti_pair(tmp_path)
    _write_nifti(pred / "a.nii.gz", np.full((6, 8, 8), 3), (1.0, 1.0, 2.0))
    with pytest.raises(EvaluationError, match=r"a\.nii\.gz contains label values \[3\]"):
        evaluate_folders(str(ref), str(pred), "synapse", num_processes=1)


def test_unknown_requested_label_is_an_error(tmp_path):
    ref, pred = _nifti_pair(tmp_path)
    message = _cli_error([str(ref), str(pred), "--protocol", "synapse", "--labels", "spleen"])
    assert "'spleen'" in message and str(pred / "dataset.json") in message


def test_missing_dataset_json_is_an_error(tmp_path):
    ref, pred = _nifti_pair(tmp_path)
    (pred / "dataset.json").unlink()
    with pytest.raises(EvaluationError, match="-djfile"):
        evaluate_folders(str(ref), str(pred), "synapse", num_processes=1)


def test_multichannel_segmentation_is_an_error(tmp_path):
    ref, pred = _folders(tmp_path)
    _dataset_json(pred / "dataset.json", {"background": 0, "polyp": 1}, ".png")
    _write_png(ref / "a.png", np.zeros((4, 4)))
    _write_png(pred / "a.png", np.zeros((4, 4, 3)))
    with pytest.raises(EvaluationError, match="3 channels"):
        evaluate_folders(str(ref), str(pred), "cvc", num_processes=1)


def test_missing_reference_folder_is_named_as_such(tmp_path):
    ref, pred = _nifti_pair(tmp_path)
    (pred / "dataset.json").unlink()
    message = _cli_error([str(tmp_path / "labelsTr"), str(pred), "--protocol", "synapse", "-np", "1"])
    assert str(tmp_path / "labelsTr") in message and "not a folder" in message and "dataset.json" not in message


def test_label_values_beyond_int32_are_reported_as_themselves(tmp_path):
    ref, pred = _nifti_pair(tmp_path)
    big = np.zeros((6, 8, 8), np.int64)
    big[0, 0, 0] = 2 ** 33
    sitk.WriteImage(sitk.GetImageFromArray(big), str(pred / "a.nii.gz"))
    with pytest.raises(EvaluationError, match=r"a\.nii\.gz contains label values \[8589934592\]"):
        evaluate_folders(str(ref), str(pred), "synapse", num_processes=1)


def test_unreadable_files_are_reported_without_reader_internals(tmp_path):
    ref, pred = _nifti_pair(tmp_path)
    (pred / "a.nii.gz").write_bytes(b"")
    message = _cli_error([str(ref), str(pred), "--protocol", "synapse", "-np", "1"])
    assert f"{pred / 'a.nii.gz'} is empty (0 bytes)" in message
    (pred / "a.nii.gz").write_bytes(b"not a nifti file at all")
    message = _cli_error([str(ref), str(pred), "--protocol", "synapse", "-np", "1"])
    assert str(pred / "a.nii.gz") in message and ".cxx" not in message and "sitk::" not in message


def test_output_that_is_an_input_is_refused(tmp_path):
    ref, pred = _nifti_pair(tmp_path)
    dataset_json = (pred / "dataset.json").read_text()
    message = _cli_error([str(ref), str(pred), "--protocol", "synapse", "-np", "1", "-o", str(pred / "dataset.json")])
    assert "is one of the evaluation's inputs" in message and str(pred / "dataset.json") in message
    assert (pred / "dataset.json").read_text() == dataset_json
    (ref / "notes.json").write_text("{}")
    with pytest.raises(EvaluationError, match="inputs"):
        evaluate_folders(str(ref), str(pred), "synapse", output_file=str(ref / "notes.json"), num_processes=1)
    assert (ref / "notes.json").read_text() == "{}"


def test_unwritable_output_is_refused_before_evaluating(tmp_path, monkeypatch):
    ref, pred = _nifti_pair(tmp_path)
    (tmp_path / "a_file").write_text("")

    def must_not_run(*args, **kwargs):
        raise AssertionError("evaluated although the output cannot be written")
    monkeypatch.setattr("nnunetv2_sa_umamba.evaluation.paper_metrics.evaluate_case", must_not_run)
    with pytest.raises(EvaluationError, match="not a folder.*-o"):
        evaluate_folders(str(ref), str(pred), "synapse", output_file=str(tmp_path / "a_file" / "out.json"),
                         num_processes=1)


@pytest.mark.read_only
def test_read_only_prediction_folder_is_refused_before_evaluating(tmp_path):
    ref, pred = _nifti_pair(tmp_path)
    pred.chmod(0o555)
    try:
        with pytest.raises(EvaluationError, match="cannot be written.*-o"):
            evaluate_folders(str(ref), str(pred), "synapse", num_processes=1)
    finally:
        pred.chmod(0o755)


def test_help_names_option_values(capsys):
    with pytest.raises(SystemExit):
        main(["-h"])
    usage = capsys.readouterr().out
    for text in ("-o OUTPUT_JSON", "-np N", "-djfile DATASET_JSON", "REFERENCE_FOLDER PREDICTION_FOLDER"):
        assert text in usage
