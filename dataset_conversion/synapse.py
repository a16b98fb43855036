"""Synapse multi-organ CT (BTCV) -> nnU-Net raw dataset, TransUNet protocol.

Sources: the raw BTCV release (RawData/Training/img/img0001.nii.gz + label/label0001.nii.gz, 13 organs,
HU) or TransUNet's preprocessed release (train_npz/caseXXXX_sliceYYY.npz, test_vol_h5/caseXXXX.npy.h5,
8 organs, intensities scaled to [0, 1], no spacing). Output: TransUNet's 8 organs; the 18 training
cases in imagesTr/labelsTr, the 12 test cases in imagesTs/labelsTs; case IDs caseXXXX.
"""
from __future__ import annotations

import argparse
import gzip
import re
import sys
import zlib
from collections import defaultdict
from functools import partial
from pathlib import Path
from typing import Literal

import h5py
import numpy as np
import SimpleITK as sitk

from dataset_conversion.common import (
    DEFAULT_NUM_WORKERS,
    SPLIT_RECORD,
    ConversionError,
    add_common_arguments,
    atomic_dataset_dir,
    find_child_dir,
    index_files,
    is_ignorable,
    make_nnunet_dirs,
    pair_by_key,
    parallel_map,
    require_dir,
    resolve_dataset_dir,
    run_cli,
    verify_with_nnunet,
    walk_dirs,
    write_dataset_json,
    write_json,
)

DEFAULT_DATASET_ID = 801
DATASET_NAME = "Synapse"
LABELS = {"background": 0, "aorta": 1, "gallbladder": 2, "kidney_left": 3, "kidney_right": 4,
          "liver": 5, "pancreas": 6, "spleen": 7, "stomach": 8}
# raw BTCV label -> TransUNet label; raw 5, 9, 10, 12, 13 (esophagus, IVC, veins, adrenals) -> background
BTCV_TO_TRANSUNET = {8: 1, 4: 2, 3: 3, 2: 4, 6: 5, 11: 6, 1: 7, 7: 8}
BTCV_NUM_LABELS = 14
TRANSUNET_IDENTITY = {i: i for i in range(1, 9)}
TEST_IDS = ("0001", "0002", "0003", "0004", "0008", "0022", "0025", "0029", "0032", "0035", "0036", "0038")
TRAIN_IDS = ("0005", "0006", "0007", "0009", "0010", "0021", "0023", "0024", "0026", "0027", "0028", "0030",
             "0031", "0033", "0034", "0037", "0039", "0040")
# TransUNet scaled clipped HU to [0, 1] in float32; allow rounding slack
_UNIT_RANGE_SLACK = 1e-4
# label volumes are at most 16-bit; a larger source label cannot occur and would size the lookup table
MAX_SOURCE_LABEL = 65535
# a label's origin may differ from its image's by this fraction of a voxel (header round-off), no more
ORIGIN_TOLERANCE_VOXELS = 0.1
DIRECTION_TOLERANCE = 1e-3

Source = Literal["auto", "raw", "transunet"]


def case_name(number: str) -> str:
    """nnU-Net case identifier for a BTCV case number, e.g. "0001" -> "case0001" (TransUNet's naming)."""
    return f"case{number}"


def parse_label_map(text: str) -> dict[int, int]:
    """"SRC:DST,SRC:DST,..." -> {src: dst}: source label -> TransUNet label (1..8, each at least once)."""
    mapping: dict[int, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        match = re.fullmatch(r"(\d+)\s*:\s*(\d+)", item)
        if not match:
            raise ConversionError(f"--label-map item {item!r} is not SRC:DST (e.g. 8:1,4:2,...)")
        src, dst = int(match[1]), int(match[2])
        if src in mapping or src == 0:
            raise ConversionError(f"--label-map maps source label {src} twice or maps background; give each "
                                  f"non-zero source label once")
        mapping[src] = dst
    return check_label_map(mapping)


def check_label_map(mapping: dict[int, int]) -> dict[int, int]:
    """Validate {source label: TransUNet label}; every TransUNet organ 1..8 must be produced."""
    too_large = sorted(s for s in mapping if not 1 <= s <= MAX_SOURCE_LABEL)
    if too_large:
        raise ConversionError(f"--label-map source labels {too_large[:3]} are outside 1..{MAX_SOURCE_LABEL}; "
                              f"give the label values the release's label volumes hold")
    bad = sorted(d for d in mapping.values() if not 1 <= d <= 8)
    if bad:
        raise ConversionError(f"--label-map targets {bad} are not TransUNet organs; targets must be 1..8 "
                              f"({', '.join(f'{v}={k}' for k, v in LABELS.items() if v)})")
    missing = sorted(set(range(1, 9)) - set(mapping.values()))
    if missing:
        raise ConversionError(f"--label-map produces no TransUNet label {missing}; map a source label to each of 1..8")
    return dict(mapping)


def lookup_table(mapping: dict[int, int], size: int) -> np.ndarray:
    """(size,) uint8 table: source label -> TransUNet label; unmapped labels -> 0."""
    table = np.zeros(max(size, max(mapping) + 1), dtype=np.uint8)
    for src, dst in mapping.items():
        table[src] = dst
    return table


def remap_labels(labels: np.ndarray, table: np.ndarray, strict: bool, path: Path, hint: str) -> np.ndarray:
    """Integer-valued label array (any shape) -> same shape uint8 via `table`.

    strict: labels beyond the table are an error (`hint` says why); otherwise they become background.
    """
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)):
            raise ConversionError(f"{path}: label values are not whole numbers; this is not a label map")
        labels = labels.astype(np.int32)
    if labels.size and labels.min() < 0:
        raise ConversionError(f"{path}: contains negative label {labels.min()}; labels must be 0 or positive")
    top = int(labels.max()) if labels.size else 0
    if top >= len(table):
        if strict:
            raise ConversionError(f"{path}: contains label {top}, but {hint}")
        labels = np.where(labels < len(table), labels, 0)  # unmapped; no table as large as the largest label
    return table[labels]


# -------------------------------------------------------------------------------------- layouts

def find_raw_release(root: Path) -> tuple[Path, Path] | None:
    """(img folder, label folder) of a raw BTCV release under `root` (any depth up to 4), or None."""
    candidates = []
    for folder in walk_dirs(root, 4):
        img, label = find_child_dir(folder, ["img"]), find_child_dir(folder, ["label"])
        if img is not None and label is not None:
            candidates.append((img, label))
    if len(candidates) > 1:
        found = ", ".join(str(c[0].parent) for c in candidates)
        raise ConversionError(f"{root} holds several img/ + label/ folder pairs ({found}); pass the one with the 30 "
                              f"labelled training cases (RawData/Training) as -i")
    return candidates[0] if candidates else None


def find_transunet_release(root: Path) -> tuple[Path, Path] | None:
    """(train_npz folder, test_vol_h5 folder) of TransUNet's release under `root` (depth up to 3), or None."""
    for folder in walk_dirs(root, 3):
        npz, h5 = find_child_dir(folder, ["train_npz"]), find_child_dir(folder, ["test_vol_h5"])
        if npz is not None or h5 is not None:
            if npz is None or h5 is None:
                missing = "train_npz" if npz is None else "test_vol_h5"
                raise ConversionError(f"{folder / missing} is missing; TransUNet's release needs both train_npz/ "
                                      f"and test_vol_h5/ side by side")
            return npz, h5
    return None


def _raw_key(prefix: str, path: Path) -> str | None:
    match = re.fullmatch(rf"{prefix}(\d{{4}})\.nii\.gz", path.name, flags=re.IGNORECASE)
    if match:
        return match[1]
    if path.name.lower().endswith((".nii", ".nii.gz")):
        raise ConversionError(f"{path}: unexpected file name; the raw BTCV release names its volumes "
                              f"{prefix}0001.nii.gz ... (gzipped); remove, rename or gzip it")
    return None


def _check_gzip_complete(path: Path) -> None:
    """ITK zero-fills a truncated .nii.gz without complaint; gzip's end-of-stream CRC and length catch it."""
    try:
        with gzip.open(path, "rb") as stream:
            while stream.read(1 << 24):
                pass
    except (EOFError, OSError, zlib.error) as error:
        raise ConversionError(f"{path}: truncated or corrupt gzip data ({error}); re-download or re-extract "
                              f"this file") from error


def _read_volume(path: Path) -> sitk.Image:
    _check_gzip_complete(path)
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise ConversionError(f"{path}: unreadable volume ({str(error).strip().splitlines()[-1]}); "
                              f"re-download or re-extract this file") from error


# ------------------------------------------------------------------------------------ per case

def _convert_raw_case(job: tuple[Path, Path, Path, Path], table: np.ndarray, strict: bool) -> int:
    """One raw BTCV case: image written as read, labels remapped; returns the largest raw label."""
    image_path, label_path, image_out, label_out = job
    image, label = _read_volume(image_path), _read_volume(label_path)
    if image.GetSize() != label.GetSize():
        raise ConversionError(f"{label_path} has size {label.GetSize()} but its image {image_path} has "
                              f"{image.GetSize()}; they must match voxel for voxel")
    if not np.allclose(image.GetSpacing(), label.GetSpacing(), rtol=1e-3, atol=1e-4):
        raise ConversionError(f"{label_path} has spacing {label.GetSpacing()} but its image {image_path} has "
                              f"{image.GetSpacing()}; they must match")
    # the label is written with the image's geometry, so it must already lie where the image lies
    shift = np.abs(np.subtract(image.GetOrigin(), label.GetOrigin()))
    if np.any(shift > ORIGIN_TOLERANCE_VOXELS * min(image.GetSpacing())) or \
            not np.allclose(image.GetDirection(), label.GetDirection(), atol=DIRECTION_TOLERANCE):
        raise ConversionError(f"{label_path} has origin {label.GetOrigin()} and direction {label.GetDirection()} but "
                              f"its image {image_path} has {image.GetOrigin()} and {image.GetDirection()}; the label "
                              f"would be misplaced. Use the label volume that belongs to this image")
    raw = sitk.GetArrayFromImage(label)
    remapped = remap_labels(raw, table, strict, label_path,
                            "raw BTCV labels are 0..13: this is another release with its own label order; "
                            "pass --label-map SRC:DST,... to say how its labels map to TransUNet's 8 organs")
    out = sitk.GetImageFromArray(remapped)
    out.CopyInformation(image)
    sitk.WriteImage(image, str(image_out), useCompression=True)
    sitk.WriteImage(out, str(label_out), useCompression=True)
    return int(raw.max()) if raw.size else 0


def _check_transunet_arrays(image: np.ndarray, label: np.ndarray, path: Path, ndim: int) -> None:
    if image.ndim != ndim or image.shape != label.shape:
        raise ConversionError(f"{path}: image {image.shape} and label {label.shape} must both be {ndim}-D and equal "
                              f"in shape; this is not TransUNet's preprocessed release")
    if image.size and (image.min() < -_UNIT_RANGE_SLACK or image.max() > 1 + _UNIT_RANGE_SLACK):
        raise ConversionError(f"{path}: intensities span [{image.min():.3g}, {image.max():.3g}], but TransUNet's "
                              f"release is scaled to [0, 1]; convert the raw BTCV release instead")


def _load_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = {"image", "label"} - set(data.files)
            if missing:
                raise ConversionError(f"{path}: keys {sorted(data.files)} lack {sorted(missing)}; TransUNet's slices "
                                      f"store 'image' and 'label'")
            image, label = data["image"], data["label"]
    except ConversionError:
        raise
    except Exception as error:  # zip/format errors of a damaged file
        raise ConversionError(f"{path}: unreadable or truncated npz ({error}); re-download or re-extract it") from error
    _check_transunet_arrays(image, label, path, ndim=2)
    return image, label


def _load_h5(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with h5py.File(path, "r") as data:
            missing = {"image", "label"} - set(data.keys())
            if missing:
                raise ConversionError(f"{path}: keys {sorted(data.keys())} lack {sorted(missing)}; TransUNet's test "
                                      f"volumes store 'image' and 'label'")
            image, label = data["image"][()], data["label"][()]
    except ConversionError:
        raise
    except Exception as error:  # HDF5 errors of a damaged file
        raise ConversionError(f"{path}: unreadable or truncated HDF5 file ({error}); "
                              f"re-download or re-extract it") from error
    _check_transunet_arrays(image, label, path, ndim=3)
    return image, label


# (spacing (x, y, z), number of slices, raw image) of the raw scan a TransUNet case borrows its spacing from
Borrowed = tuple[tuple[float, float, float], int, Path]


def _spacing_for(borrowed: Borrowed | None, depth: int, path: Path) -> tuple[float, float, float]:
    if borrowed is None:
        return 1.0, 1.0, 1.0
    spacing, raw_depth, raw_image = borrowed
    if raw_depth != depth:
        raise ConversionError(f"{path}: this case has {depth} slices but {raw_image} has {raw_depth}; they are not "
                              f"the same scan, so its spacing cannot be borrowed")
    return spacing


def _write_transunet_case(image: np.ndarray, label: np.ndarray, label_path: Path, spacing: tuple[float, float, float],
                          outputs: tuple[Path, Path], table: np.ndarray, strict: bool) -> None:
    """image, label: (D, H, W); spacing in SimpleITK's (x, y, z) order."""
    remapped = remap_labels(label, table, strict, label_path,
                            "TransUNet's labels are 0..8; pass --label-map for a release with other labels")
    for array, path in ((image.astype(np.float32), outputs[0]), (remapped, outputs[1])):
        volume = sitk.GetImageFromArray(array)
        volume.SetSpacing(spacing)
        sitk.WriteImage(volume, str(path), useCompression=True)


def _convert_npz_case(job: tuple[list[Path], tuple[Path, Path], Borrowed | None],
                      table: np.ndarray, strict: bool) -> None:
    """Re-stack one training case's (H, W) slices, in slice order, into a (D, H, W) volume."""
    slices, outputs, borrowed = job
    images, labels = [], []
    for path in slices:
        image, label = _load_npz(path)
        if images and image.shape != images[0].shape:
            raise ConversionError(f"{path}: slice shape {image.shape} differs from {slices[0]} ({images[0].shape}); "
                                  f"all slices of a case must have one shape")
        images.append(image)
        labels.append(label)
    spacing = _spacing_for(borrowed, len(slices), slices[0])
    _write_transunet_case(np.stack(images), np.stack(labels), slices[0], spacing, outputs, table, strict)


def _convert_h5_case(job: tuple[Path, tuple[Path, Path], Borrowed | None], table: np.ndarray, strict: bool) -> None:
    """One (D, H, W) test volume."""
    path, outputs, borrowed = job
    image, label = _load_h5(path)
    _write_transunet_case(image, label, path, _spacing_for(borrowed, image.shape[0], path), outputs, table, strict)


# ----------------------------------------------------------------------------------- conversion

def _raw_cases(img_dir: Path, label_dir: Path) -> list[tuple[str, Path, Path]]:
    pairs = pair_by_key(index_files(img_dir, partial(_raw_key, "img")),
                        index_files(label_dir, partial(_raw_key, "label")), img_dir, label_dir, ("image", "label"))
    found = {k for k, _, _ in pairs}
    missing = sorted(set(TRAIN_IDS + TEST_IDS) - found)
    if missing:
        raise ConversionError(f"{img_dir / f'img{missing[0]}.nii.gz'} is missing ({len(missing)} of the 30 labelled "
                              f"BTCV cases missing in all); the 18/12 split needs all 30")
    extra = sorted(found - set(TRAIN_IDS + TEST_IDS))
    if extra:
        raise ConversionError(f"{img_dir / f'img{extra[0]}.nii.gz'} is not one of the 30 labelled BTCV cases "
                              f"(0001-0010, 0021-0040); remove it: the 18/12 split is defined on those 30 only")
    return pairs


def _raw_headers(raw_root: Path) -> dict[str, Borrowed]:
    """{case number: (spacing (x, y, z), slices, file)} from the image headers of a raw BTCV release."""
    found = find_raw_release(raw_root)
    if found is None:
        raise ConversionError(f"{raw_root}: no raw BTCV release (RawData/Training/img + label) found for "
                              f"--spacing-from; point it at the folder holding RawData")
    headers = {}
    for number, path in index_files(found[0], partial(_raw_key, "img")).items():
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
        except RuntimeError as error:
            raise ConversionError(f"{path}: unreadable volume header; re-download or re-extract it") from error
        headers[number] = (tuple(float(s) for s in reader.GetSpacing()), int(reader.GetSize()[2]), path)
    return headers


def _borrowed(headers: dict[str, Borrowed], number: str, raw_root: Path | None) -> Borrowed | None:
    if raw_root is None:
        return None
    if number not in headers:
        raise ConversionError(f"{raw_root}: no img{number}.nii.gz to borrow case{number}'s spacing from; "
                              f"--spacing-from needs the complete raw release")
    return headers[number]


def _npz_key(path: Path) -> tuple[str, int]:
    match = re.fullmatch(r"case(\d{4})_slice(\d+)\.npz", path.name)
    if not match:
        raise ConversionError(f"{path}: unexpected file; train_npz/ holds caseXXXX_sliceYYY.npz only")
    return match[1], int(match[2])


def _h5_key(path: Path) -> str | None:
    match = re.fullmatch(r"case(\d{4})\.npy\.h5", path.name)
    if not match:
        raise ConversionError(f"{path}: unexpected file; test_vol_h5/ holds caseXXXX.npy.h5 only")
    return match[1]


def _check_case_set(found: set[str], expected: tuple[str, ...], folder: Path, pattern: str) -> None:
    missing = sorted(set(expected) - found)
    if missing:
        raise ConversionError(f"{folder / pattern.format(missing[0])} is missing ({len(missing)} case(s) missing in "
                              f"all); TransUNet's release has the cases {', '.join(expected)} here")
    extra = sorted(found - set(expected))
    if extra:
        raise ConversionError(f"{folder / pattern.format(extra[0])} is not expected here: this folder should hold "
                              f"exactly the cases {', '.join(expected)}; remove the others")


def _transunet_jobs(npz_dir: Path, h5_dir: Path, dirs: dict[str, Path],
                    spacing_from: Path | None) -> tuple[list, list]:
    """Jobs for _convert_npz_case (the 18 training cases) and _convert_h5_case (the 12 test cases)."""
    slices: dict[str, dict[int, Path]] = defaultdict(dict)
    for path in sorted(npz_dir.iterdir()):
        if not path.is_file() or is_ignorable(path):
            continue
        number, index = _npz_key(path)
        if index in slices[number]:
            raise ConversionError(f"{path} and {slices[number][index]} are the same slice; remove one")
        slices[number][index] = path
    volumes = index_files(h5_dir, _h5_key)
    _check_case_set(set(slices), TRAIN_IDS, npz_dir, "case{}_slice000.npz")
    _check_case_set(set(volumes), TEST_IDS, h5_dir, "case{}.npy.h5")
    headers = _raw_headers(spacing_from) if spacing_from is not None else {}
    npz_jobs = []
    for number in TRAIN_IDS:
        by_index = slices[number]
        gap = next((i for i in range(len(by_index)) if i not in by_index), None)
        if gap is not None:
            raise ConversionError(f"{npz_dir / f'case{number}_slice{gap:03d}.npz'} is missing: case{number}'s "
                                  f"slices must be numbered from 0 without gaps (found up to "
                                  f"{by_index[max(by_index)].name}); restore the missing slice")
        npz_jobs.append(([by_index[i] for i in range(len(by_index))],
                         (dirs["imagesTr"] / f"{case_name(number)}_0000.nii.gz",
                          dirs["labelsTr"] / f"{case_name(number)}.nii.gz"),
                         _borrowed(headers, number, spacing_from)))
    h5_jobs = [(volumes[number], (dirs["imagesTs"] / f"{case_name(number)}_0000.nii.gz",
                                  dirs["labelsTs"] / f"{case_name(number)}.nii.gz"),
                _borrowed(headers, number, spacing_from)) for number in TEST_IDS]
    return npz_jobs, h5_jobs


def convert_synapse(input_dir: str | Path, output: str | Path | None = None, dataset_id: int = DEFAULT_DATASET_ID,
                    source: Source = "auto", label_map: dict[int, int] | None = None,
                    spacing_from: str | Path | None = None, overwrite: bool = False,
                    num_workers: int = DEFAULT_NUM_WORKERS, verify: bool = True) -> Path:
    """Convert Synapse (raw BTCV or TransUNet's release) into `output`/DatasetXXX_Synapse; returns that folder.

    label_map: {source label: TransUNet label 1..8} for a release whose label order is not raw BTCV's
    (raw source) or TransUNet's (transunet source). spacing_from: a raw BTCV release to copy the real
    voxel spacing from when converting TransUNet's release (which stores none; 1 mm is written otherwise).
    """
    if source not in ("auto", "raw", "transunet"):
        raise ValueError(f"source must be 'auto', 'raw' or 'transunet', not {source!r}")
    input_dir = require_dir(Path(input_dir), "the Synapse download")
    spacing_from = Path(spacing_from) if spacing_from is not None else None
    if label_map is not None:
        label_map = check_label_map(label_map)
    raw = find_raw_release(input_dir) if source in ("auto", "raw") else None
    transunet = find_transunet_release(input_dir) if source in ("auto", "transunet") else None
    if raw and transunet:
        raise ConversionError(f"{input_dir} holds both the raw BTCV release ({raw[0].parent}) and TransUNet's "
                              f"({transunet[0].parent}); pick one with --source raw or --source transunet")
    if not raw and not transunet:
        raise ConversionError(f"{input_dir}: no Synapse release found; expected RawData/Training/img + label/ (raw "
                              f"BTCV) or train_npz/ + test_vol_h5/ (TransUNet); point -i at the folder holding them")
    if raw and spacing_from is not None:
        raise ConversionError("--spacing-from is for TransUNet's release only; the raw release has its own spacing")
    dest = resolve_dataset_dir(output, dataset_id, DATASET_NAME)
    # the default maps know every valid label (others are errors); a user's map sends unmapped labels to 0
    strict = label_map is None
    if raw:
        pairs = _raw_cases(*raw)
        mapping = label_map or BTCV_TO_TRANSUNET
        table = lookup_table(mapping, BTCV_NUM_LABELS)
    else:
        mapping = label_map or TRANSUNET_IDENTITY
        table = lookup_table(mapping, len(LABELS))

    with atomic_dataset_dir(dest, overwrite, input_dir) as tmp:
        dirs = make_nnunet_dirs(tmp)
        if raw:
            jobs = []
            for number, image, label in pairs:
                split = "Tr" if number in TRAIN_IDS else "Ts"
                jobs.append((image, label, dirs[f"images{split}"] / f"{case_name(number)}_0000.nii.gz",
                             dirs[f"labels{split}"] / f"{case_name(number)}.nii.gz"))
            peaks = parallel_map(partial(_convert_raw_case, table=table, strict=strict), jobs, num_workers,
                                 "Synapse (raw BTCV)")
            if strict and max(peaks) <= 8:
                raise ConversionError(f"{raw[1]}: no label volume holds a raw BTCV label above 8 (raw BTCV labels "
                                      f"the pancreas 11), so this looks like a release already reduced to 8 organs "
                                      f"in an unknown order; if you know its order, pass --label-map SRC:DST,...")
            channel, source_name = "CT", "raw BTCV (RawData/Training)"
        else:
            npz_jobs, h5_jobs = _transunet_jobs(*transunet, dirs, spacing_from)
            parallel_map(partial(_convert_npz_case, table=table, strict=strict), npz_jobs, num_workers,
                         "Synapse train (npz)")
            parallel_map(partial(_convert_h5_case, table=table, strict=strict), h5_jobs, num_workers,
                         "Synapse test (h5)")
            # already clipped and scaled to [0, 1]: CT normalisation would re-clip by foreground percentiles
            channel, source_name = "zscore", "TransUNet preprocessed (train_npz, test_vol_h5)"
        write_dataset_json(
            tmp, {"0": channel}, LABELS, len(TRAIN_IDS), ".nii.gz", "https://www.synapse.org/#!Synapse:syn3193805",
            dataset_name=dest.name, description="Synapse multi-organ CT, TransUNet's 8 organs and 18/12 split",
            conversion={"source": source_name, "label_map": {str(k): v for k, v in sorted(mapping.items())},
                        "spacing": "from the NIfTI headers" if raw or spacing_from else "none stored; 1 mm written"})
        write_json(tmp / SPLIT_RECORD, {"split": "TransUNet 18/12",
                                        "train": [case_name(n) for n in TRAIN_IDS],
                                        "test": [case_name(n) for n in TEST_IDS]})
        if verify:
            verify_with_nnunet(tmp, dest.name, num_workers)
    if transunet and spacing_from is None:
        print("note: TransUNet's release stores no voxel spacing, so 1 x 1 x 1 mm was written; pass "
              "--spacing-from RAW_BTCV_FOLDER to copy the real spacing from the raw release", file=sys.stderr)
    return dest


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface of saumamba_convert_synapse."""
    parser = argparse.ArgumentParser(
        prog="saumamba_convert_synapse",
        description="Convert Synapse multi-organ CT (raw BTCV or TransUNet's preprocessed release) to an nnU-Net "
                    "raw dataset with TransUNet's 8 organs and 18/12 train/test split.")
    add_common_arguments(parser, DEFAULT_DATASET_ID, DATASET_NAME)
    parser.add_argument("--source", choices=["auto", "raw", "transunet"], default="auto",
                        help="which release -i holds (default: detect)")
    parser.add_argument("--label-map", type=str, default=None,
                        help="SRC:DST,... from the release's labels to TransUNet's (1 aorta, 2 gallbladder, "
                             "3 kidney_left, 4 kidney_right, 5 liver, 6 pancreas, 7 spleen, 8 stomach); only for "
                             "releases whose label order is neither raw BTCV's nor TransUNet's")
    parser.add_argument("--spacing-from", type=Path, default=None,
                        help="raw BTCV release to copy voxel spacing from (TransUNet's release stores none)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """saumamba_convert_synapse; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)

    def convert() -> Path:
        label_map = parse_label_map(args.label_map) if args.label_map is not None else None
        return convert_synapse(args.input, args.output, args.dataset_id, args.source, label_map, args.spacing_from,
                               args.overwrite, args.num_workers, not args.no_verify)
    return run_cli(convert, parser.prog)


if __name__ == "__main__":
    sys.exit(main())
