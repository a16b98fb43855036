"""ISIC 2017 / ISIC 2018 lesion segmentation -> nnU-Net raw dataset (RGB PNG images, {0, 1} PNG masks).

Sources: the official challenge folders (ISIC-2017_Training_Data + ISIC-2017_Training_Part1_GroundTruth,
..., ISIC2018_Task1-2_Training_Input + ISIC2018_Task1_Training_GroundTruth, ...) or VM-UNet's archive
(isic2017/{train,val}/{images,masks}). Splits: "official" (training + validation -> imagesTr with the
official validation as fold 0's val in splits_final.json, test -> imagesTs), "7:3" (the paper's
protocol: training + validation split 70/30 with a seed, the 30 % -> imagesTs) and "archive" (VM-UNet's
train -> imagesTr, val -> imagesTs). Case IDs are the ISIC image IDs (ISIC_0000000).
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

from dataset_conversion.common import (
    DEFAULT_NUM_WORKERS,
    RGB_CHANNEL_NAMES,
    SPLIT_RECORD,
    ConversionError,
    add_common_arguments,
    atomic_dataset_dir,
    convert_image_mask_pair,
    find_child_dir,
    index_files,
    make_nnunet_dirs,
    pair_by_key,
    parallel_map,
    positive_int,
    require_dir,
    resolve_dataset_dir,
    run_cli,
    seeded_partition,
    share,
    unwrap_same_name,
    verify_with_nnunet,
    write_dataset_json,
    write_json,
    write_splits_final,
)

Split = Literal["auto", "official", "7:3", "archive"]
Part = list[tuple[str, Path, Path]]  # [(case ID, image, mask)]


@dataclass(frozen=True)
class IsicRelease:
    """Folder names of one challenge year; each part is (image folder names, mask folder names)."""
    year: int
    dataset_name: str
    default_id: int
    train: tuple[tuple[str, ...], tuple[str, ...]]
    val: tuple[tuple[str, ...], tuple[str, ...]]
    test: tuple[tuple[str, ...], tuple[str, ...]]
    archive_names: tuple[str, ...]
    reference: str


ISIC2017 = IsicRelease(
    2017, "ISIC2017", 802,
    train=(("ISIC-2017_Training_Data",), ("ISIC-2017_Training_Part1_GroundTruth",)),
    val=(("ISIC-2017_Validation_Data",), ("ISIC-2017_Validation_Part1_GroundTruth",)),
    test=(("ISIC-2017_Test_v2_Data", "ISIC-2017_Test_Data"),
          ("ISIC-2017_Test_v2_Part1_GroundTruth", "ISIC-2017_Test_Part1_GroundTruth")),
    archive_names=("isic2017", "isic17"),
    reference="https://challenge.isic-archive.com/data/#2017")
ISIC2018 = IsicRelease(
    2018, "ISIC2018", 803,
    train=(("ISIC2018_Task1-2_Training_Input",), ("ISIC2018_Task1_Training_GroundTruth",)),
    val=(("ISIC2018_Task1-2_Validation_Input",), ("ISIC2018_Task1_Validation_GroundTruth",)),
    test=(("ISIC2018_Task1-2_Test_Input",), ("ISIC2018_Task1_Test_GroundTruth",)),
    archive_names=("isic2018", "isic18"),
    reference="https://challenge.isic-archive.com/data/#2018")
RELEASES = {2017: ISIC2017, 2018: ISIC2018}
LABELS = {"background": 0, "lesion": 1}
# files the official folders ship beside the images and masks
_SIDE_FILES = (".csv", ".txt", ".pdf", ".md", ".json")


def _official_image_key(path: Path) -> str | None:
    if re.fullmatch(r"ISIC_\d+\.jpe?g", path.name, flags=re.IGNORECASE):
        return path.name.rsplit(".", 1)[0]
    if path.name.lower().endswith(("_superpixels.png", *_SIDE_FILES)):
        return None
    raise ConversionError(f"{path}: unexpected file in an ISIC image folder (expected ISIC_XXXXXXX.jpg, superpixel "
                          f"PNGs, metadata or licence files); remove it")


def _official_mask_key(path: Path) -> str | None:
    match = re.fullmatch(r"(ISIC_\d+)_segmentation\.png", path.name, flags=re.IGNORECASE)
    if match:
        return match[1]
    if path.name.lower().endswith(_SIDE_FILES):
        return None
    raise ConversionError(f"{path}: unexpected file in an ISIC ground-truth folder (expected "
                          f"ISIC_XXXXXXX_segmentation.png or licence files); remove it")


def _archive_image_key(path: Path) -> str | None:
    if path.suffix.lower() in (".png", ".jpg", ".jpeg"):
        return path.stem
    raise ConversionError(f"{path}: unexpected file in an image folder (expected .png or .jpg); remove it")


def _archive_mask_key(path: Path) -> str | None:
    if path.suffix.lower() == ".png":
        return re.sub(r"_segmentation$", "", path.stem, flags=re.IGNORECASE)
    raise ConversionError(f"{path}: unexpected file in a mask folder (expected .png); remove it")


def _read_part(image_dir: Path, mask_dir: Path, archive: bool) -> Part:
    image_key, mask_key = ((_archive_image_key, _archive_mask_key) if archive
                           else (_official_image_key, _official_mask_key))
    return pair_by_key(index_files(image_dir, image_key), index_files(mask_dir, mask_key), image_dir, mask_dir)


def _find_official_part(root: Path, names: tuple[tuple[str, ...], tuple[str, ...]]) -> tuple[Path, Path] | None:
    """(image folder, mask folder) of one official part, None if its image folder is absent."""
    image_dir = find_child_dir(root, names[0])
    if image_dir is None:
        return None
    mask_dir = find_child_dir(root, names[1])
    if mask_dir is None:
        raise ConversionError(f"{root / names[1][0]} is missing; download the ground truth that goes with "
                              f"{image_dir.name} and extract it beside it")
    return unwrap_same_name(image_dir), unwrap_same_name(mask_dir)


def _find_archive(root: Path, release: IsicRelease) -> Path | None:
    """The folder holding VM-UNet's train/ and val/ (the root itself or root/isic2017, root/isic17)."""
    for folder in (root, find_child_dir(root, release.archive_names)):
        if folder is not None and find_child_dir(folder, ["train"]) and find_child_dir(folder, ["val"]):
            return folder
    return None


def _read_archive_part(folder: Path, part: str) -> Part:
    part_dir = find_child_dir(folder, [part])
    images, masks = find_child_dir(part_dir, ["images"]), find_child_dir(part_dir, ["masks"])
    if images is None or masks is None:
        raise ConversionError(f"{part_dir / ('images' if images is None else 'masks')} is missing; VM-UNet's archive "
                              f"has {part}/images and {part}/masks")
    return _read_part(images, masks, archive=True)


def _load_layout(root: Path, release: IsicRelease, split: Split) -> tuple[str, dict[str, Part]]:
    """Detect the layout and read the parts the split needs: ("official" | "archive", {part: pairs})."""
    train = _find_official_part(root, release.train)
    if train is not None:
        if split == "archive":
            raise ConversionError(f"{root} holds the official ISIC {release.year} folders, not VM-UNet's archive; "
                                  f"use --split official or --split 7:3")
        val = _find_official_part(root, release.val)
        if val is None:
            raise ConversionError(f"{root / release.val[0][0]} is missing; both splits use the official training "
                                  f"and validation sets, so download and extract the validation set too")
        parts = {"train": _read_part(*train, archive=False), "val": _read_part(*val, archive=False)}
        if split == "official":
            test = _find_official_part(root, release.test)
            if test is None:
                raise ConversionError(f"{root / release.test[0][0]} is missing; --split official needs the test set "
                                      f"(or use --split 7:3, which does not)")
            parts["test"] = _read_part(*test, archive=False)
        return "official", parts
    archive = _find_archive(root, release)
    if archive is not None:
        if split == "official":
            raise ConversionError(f"{archive} is VM-UNet's archive, which has no official test set; "
                                  f"use --split archive (its own split) or --split 7:3")
        return "archive", {"train": _read_archive_part(archive, "train"), "val": _read_archive_part(archive, "val")}
    raise ConversionError(f"{root}: no ISIC {release.year} data found; expected {release.train[0][0]}/ + "
                          f"{release.train[1][0]}/ (official) or {release.archive_names[0]}/train/images "
                          f"(VM-UNet's archive); point -i at the folder holding them")


def _check_disjoint(parts: dict[str, Part]) -> None:
    seen: dict[str, Path] = {}
    for pairs in parts.values():
        for case_id, image, _ in pairs:
            if case_id in seen:
                raise ConversionError(f"{image} and {seen[case_id]} are the same case ({case_id}) in two parts of the "
                                      f"release; remove one")
            seen[case_id] = image


def convert_isic(year: int, input_dir: str | Path, output: str | Path | None = None, dataset_id: int | None = None,
                 split: Split = "auto", seed: int = 0, resize: int | None = None, overwrite: bool = False,
                 num_workers: int = DEFAULT_NUM_WORKERS, verify: bool = True) -> Path:
    """Convert ISIC `year` (2017 or 2018) into `output`/DatasetXXX_ISIC<year>; returns that folder.

    split "auto" is "7:3" for the official folders and "archive" for VM-UNet's archive. seed fixes the
    7:3 split. resize: side of square outputs (bilinear image, nearest mask); None keeps native size.
    """
    release = RELEASES[year]
    if split not in ("auto", "official", "7:3", "archive"):
        raise ValueError(f"unknown split {split!r}")
    input_dir = require_dir(Path(input_dir), f"the ISIC {year} download")
    layout, parts = _load_layout(input_dir, release, split)
    _check_disjoint(parts)
    if split == "auto":
        split = "7:3" if layout == "official" else "archive"
    dest = resolve_dataset_dir(output, release.default_id if dataset_id is None else dataset_id, release.dataset_name)

    by_id = {case_id: (image, mask) for pairs in parts.values() for case_id, image, mask in pairs}
    ids = {name: [case_id for case_id, _, _ in pairs] for name, pairs in parts.items()}
    if split == "7:3":
        pool = ids["train"] + ids["val"]
        train, test = seeded_partition(pool, seed, [len(pool) - share(len(pool), 3), share(len(pool), 3)])
        record = {"split": "7:3", "seed": seed, "train": train, "test": test}
    elif split == "official":
        train, test = ids["train"] + ids["val"], ids["test"]
        record = {"split": "official", "train": ids["train"], "val": ids["val"], "test": test}
    else:
        train, test = ids["train"], ids["val"]
        record = {"split": "archive", "train": train, "test": test}

    with atomic_dataset_dir(dest, overwrite, input_dir) as tmp:
        dirs = make_nnunet_dirs(tmp)
        jobs = [(*by_id[c], dirs["imagesTr"] / f"{c}_0000.png", dirs["labelsTr"] / f"{c}.png") for c in train]
        jobs += [(*by_id[c], dirs["imagesTs"] / f"{c}_0000.png", dirs["labelsTs"] / f"{c}.png") for c in test]
        parallel_map(partial(convert_image_mask_pair, mask_rule="exact", resize=resize), jobs, num_workers,
                     f"ISIC {year}")
        write_dataset_json(tmp, RGB_CHANNEL_NAMES, LABELS, len(train), ".png", release.reference,
                           dataset_name=dest.name, description=f"ISIC {year} lesion segmentation",
                           conversion={"layout": layout, "split": split, "seed": seed if split == "7:3" else None,
                                       "resize": resize})
        write_json(tmp / SPLIT_RECORD, record)
        if split == "official":
            write_splits_final(tmp, [{"train": ids["train"], "val": ids["val"]}])
        if verify:
            verify_with_nnunet(tmp, dest.name, num_workers)
    return dest


def build_parser(year: int) -> argparse.ArgumentParser:
    """Command-line interface of saumamba_convert_isic<year>."""
    release = RELEASES[year]
    parser = argparse.ArgumentParser(
        prog=f"saumamba_convert_isic{year}",
        description=f"Convert ISIC {year} lesion segmentation (official folders or VM-UNet's archive) to an "
                    f"nnU-Net raw dataset of RGB PNGs and {{0, 1}} masks.")
    add_common_arguments(parser, release.default_id, release.dataset_name)
    parser.add_argument("--split", choices=["auto", "official", "7:3", "archive"], default="auto",
                        help="official: train+val -> imagesTr, test -> imagesTs; 7:3: the paper's seeded 70/30 split "
                             "of train+val; archive: VM-UNet's train/val; auto (default): 7:3 for the official "
                             "folders, archive for VM-UNet's archive")
    parser.add_argument("--seed", type=int, default=0, help="seed of the 7:3 split (default 0)")
    parser.add_argument("--resize", type=positive_int, default=None, metavar="N",
                        help="resize to N x N (the paper uses 256; bilinear image, nearest mask); "
                             "default: native resolution")
    return parser


def _main(year: int, argv: list[str] | None) -> int:
    parser = build_parser(year)
    args = parser.parse_args(argv)
    return run_cli(lambda: convert_isic(year, args.input, args.output, args.dataset_id, args.split, args.seed,
                                        args.resize, args.overwrite, args.num_workers, not args.no_verify),
                   parser.prog)


def main_2017(argv: list[str] | None = None) -> int:
    """saumamba_convert_isic2017; returns the exit code."""
    return _main(2017, argv)


def main_2018(argv: list[str] | None = None) -> int:
    """saumamba_convert_isic2018; returns the exit code."""
    return _main(2018, argv)


def main(argv: list[str] | None = None) -> int:
    """`python -m dataset_conversion.isic {2017,2018} ...`; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("2017", "2018"):
        print("usage: python -m dataset_conversion.isic {2017,2018} -i FOLDER [options]", file=sys.stderr)
        return 2
    return _main(int(argv[0]), argv[1:])


if __name__ == "__main__":
    sys.exit(main())
