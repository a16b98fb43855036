"""Per-mask metrics of the paper's three evaluation protocols (see docs/METRICS.md).

Every function takes plain numpy arrays; masks are boolean arrays of one shape, 2D (H, W) or 3D (D, H, W).
"""
from typing import Dict, Optional, Sequence, Tuple

import numpy as np


def confusion_counts(pred: np.ndarray, ref: np.ndarray) -> Tuple[int, int, int, int]:
    """(TP, FP, FN, TN) of two boolean masks of equal shape, as Python ints (no overflow when pooled)."""
    tp = int(np.count_nonzero(pred & ref))
    fp = int(np.count_nonzero(pred)) - tp
    fn = int(np.count_nonzero(ref)) - tp
    tn = pred.size - tp - fp - fn
    return tp, fp, fn, tn


def _ratio(numerator: float, denominator: float) -> float:
    # VM-UNet's and torchmetrics' convention: an undefined ratio counts as 0.
    return float(numerator) / float(denominator) if denominator else 0.0


def _bounding_slices(mask: np.ndarray) -> Tuple[slice, ...]:
    """Bounding box of `mask`'s non-zero voxels."""
    slices = []
    for axis in range(mask.ndim):
        other_axes = tuple(a for a in range(mask.ndim) if a != axis)
        nonzero = np.flatnonzero(np.any(mask, axis=other_axes))
        slices.append(slice(int(nonzero[0]), int(nonzero[-1]) + 1))
    return tuple(slices)


def hd95(pred: np.ndarray, ref: np.ndarray, spacing: Optional[Sequence[float]] = None) -> float:
    """medpy's HD95: 95th percentile of the pooled surface distances pred->ref and ref->pred.

    Both masks must be non-empty. `spacing` (one value per axis, in the array's axis order) gives
    distances in physical units; None gives voxel units, as TransUNet reports.
    The masks are cropped to their joint bounding box first: medpy erodes with a background border
    (all that lies outside the box is background anyway) and the distance transform is exact, so the
    result is the same, only faster on large, mostly empty volumes.
    """
    if not pred.any() or not ref.any():
        raise ValueError("hd95 needs two non-empty masks; apply the empty-mask rules before calling it")
    # imported here: only the Synapse protocol needs medpy, and the Dice/IoU protocols run without it
    from medpy.metric.binary import hd95 as medpy_hd95
    crop = _bounding_slices(pred | ref)
    return float(medpy_hd95(pred[crop], ref[crop], voxelspacing=spacing))


def synapse_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> Dict[str, object]:
    """TransUNet's per-case, per-organ Dice and HD95 with its empty-mask rules.

    pred and ref non-empty -> (Dice, HD95); pred non-empty, ref empty -> (1, 0); pred empty -> (0, 0),
    also when ref is empty. HD95 is given in voxels ('HD95') and with `spacing` ('HD95_mm').
    """
    pred_empty, ref_empty = not pred.any(), not ref.any()
    tp, fp, fn, _ = confusion_counts(pred, ref)
    if pred_empty:
        rule, dice, hd_voxel, hd_mm = "pred_empty", 0.0, 0.0, 0.0
    elif ref_empty:
        rule, dice, hd_voxel, hd_mm = "ref_empty", 1.0, 0.0, 0.0
    else:
        rule = "both_present"
        dice = 2 * tp / (2 * tp + fp + fn)
        hd_voxel = hd95(pred, ref)
        hd_mm = hd95(pred, ref, spacing)
    return {"Dice": dice, "HD95": hd_voxel, "HD95_mm": hd_mm, "rule": rule,
            "n_pred": tp + fp, "n_ref": tp + fn}


def pooled_metrics(tp: int, fp: int, fn: int, tn: int) -> Dict[str, float]:
    """VM-UNet's ISIC metrics of one confusion matrix pooled over all test pixels.

    mIoU is the foreground IoU TP/(TP+FP+FN); DSC 2TP/(2TP+FP+FN); Acc; Spe TN/(TN+FP); Sen TP/(TP+FN).
    """
    return {
        "mIoU": _ratio(tp, tp + fp + fn),
        "DSC": _ratio(2 * tp, 2 * tp + fp + fn),
        "Acc": _ratio(tp + tn, tp + fp + fn + tn),
        "Spe": _ratio(tn, tn + fp),
        "Sen": _ratio(tp, tp + fn),
    }


def cvc_image_metrics(tp: int, fp: int, fn: int, tn: int) -> Dict[str, float]:
    """BRAU-Net++'s per-image metrics: IoU (I+1)/(U+1), Dice (2I+1)/(|P|+|G|+1), Acc, Precision, Recall."""
    return {
        "IoU": (tp + 1) / (tp + fp + fn + 1),
        "Dice": (2 * tp + 1) / (2 * tp + fp + fn + 1),
        "Acc": _ratio(tp + tn, tp + fp + fn + tn),
        "Precision": _ratio(tp, tp + fp),
        "Recall": _ratio(tp, tp + fn),
    }
