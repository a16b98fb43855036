"""CVC-ClinicDB polyp segmentation -> nnU-Net raw dataset (RGB PNG images, {0, 1} PNG masks).

Source: Original/1.tif ... 612.tif with Ground Truth/1.tif ..., or the PNG mirror (PNG/Original,
PNG/Ground Truth); folder names are matched ignoring case, spaces, '_' and '-', frames paired on their
number. Masks may be 3-channel: the first channel is kept and thresholded at > 127.
Split "random" (the paper's protocol; its 490/61/61 is unpublished, so it is seeded and recorded): 10 % test,
10 % validation, the rest training, rounded half up; for 612 frames 490/61/61. Split "video": whole video
sequences (the dataset's own frame -> sequence table) go to test and to validation, seeded, each about 10 % of
the frames, so that no sequence is split between training, validation and test.
Training + validation go to imagesTr with splits_final.json fold 0 = training / validation; the test frames go
to imagesTs. Case IDs are cvc_0001 ... cvc_0612 (the frame number).
"""
from __future__ import annotations

import argparse
import re
import sys
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
    seeded_order,
    seeded_partition,
    share,
    verify_with_nnunet,
    walk_dirs,
    write_dataset_json,
    write_json,
    write_splits_final,
)

DEFAULT_DATASET_ID = 804
DATASET_NAME = "CVCClinicDB"
LABELS = {"background": 0, "polyp": 1}
IMAGE_DIR_NAMES = ("Original", "Originals", "Images", "Image")
MASK_DIR_NAMES = ("Ground Truth", "GroundTruth", "GT", "Masks", "Mask")
_EXTENSIONS = (".tif", ".tiff", ".png", ".bmp", ".jpg", ".jpeg")  # JPEG: resized mirrors
# (first frame, last frame) of video sequences 1..29, from the table "correspondence between the number of frame
# and the video sequence" in the README.txt that ships with CVC-ClinicDB (polyp.grand-challenge.org/CVCClinicDB)
SEQUENCE_FRAMES = (
    (1, 25), (26, 50), (51, 67), (68, 78), (79, 103), (104, 126), (127, 151), (152, 177), (178, 199), (200, 205),
    (206, 227), (228, 252), (253, 277), (278, 297), (298, 317), (318, 342), (343, 363), (364, 383), (384, 408),
    (409, 428), (429, 447), (448, 466), (467, 478), (479, 503), (504, 528), (529, 546), (547, 571), (572, 591),
    (592, 612),
)
Split = Literal["random", "video"]


def case_name(frame: int) -> str:
    """nnU-Net case identifier of a frame number, e.g. 7 -> "cvc_0007"."""
    return f"cvc_{frame:04d}"


def _frame_key(path: Path) -> str | None:
    if path.suffix.lower() not in _EXTENSIONS:
        raise ConversionError(f"{path}: unexpected file (CVC-ClinicDB frames are 1.tif ... 612.tif, .png or .jpg); "
                              "remove it")
    if not re.fullmatch(r"\d+", path.stem):
        raise ConversionError(f"{path}: file name is not a frame number (CVC-ClinicDB frames are 1.tif ... 612.tif); "
                              f"remove or rename it")
    return case_name(int(path.stem))


def find_frames(root: Path) -> tuple[Path, Path]:
    """(image folder, mask folder) of CVC-ClinicDB under `root` (depth up to 3).

    Where both the TIFF originals and the PNG mirror are present (e.g. Kaggle's PNG/ and TIF/), the
    TIFF originals are used.
    """
    candidates = []
    for folder in walk_dirs(root, 3):
        images, masks = find_child_dir(folder, IMAGE_DIR_NAMES), find_child_dir(folder, MASK_DIR_NAMES)
        if images is not None and masks is not None:
            candidates.append((images, masks))
    if not candidates:
        raise ConversionError(f"{root}: no CVC-ClinicDB folders found; expected Original/ and Ground Truth/ "
                              f"(or PNG/Original and PNG/Ground Truth); point -i at the folder holding them")
    if len(candidates) > 1:
        tiff = [c for c in candidates if any(p.suffix.lower() in (".tif", ".tiff") for p in c[0].iterdir())]
        if len(tiff) != 1:
            found = ", ".join(str(c[0].parent) for c in candidates)
            raise ConversionError(f"{root} holds several CVC-ClinicDB copies ({found}); point -i at the one to convert")
        candidates = tiff
    return candidates[0]


def cvc_split(case_ids: list[str], seed: int) -> tuple[list[str], list[str], list[str]]:
    """(train, val, test), each sorted: 10 % test, 10 % val (rounded half up), the rest train."""
    held_out = share(len(case_ids), 1)
    test, val, train = seeded_partition(case_ids, seed, [held_out, held_out, len(case_ids) - 2 * held_out])
    return train, val, test


def sequence_of(frame: int) -> int:
    """Video sequence (1..29) of a CVC-ClinicDB frame number (1..612)."""
    for sequence, (first, last) in enumerate(SEQUENCE_FRAMES, start=1):
        if first <= frame <= last:
            return sequence
    raise ValueError(f"frame {frame} is outside CVC-ClinicDB's frames 1..{SEQUENCE_FRAMES[-1][1]}")


def _take_sequences(order: list[int], sizes: dict[int, int], target: int) -> list[int]:
    """Sequences from `order`, in that order, each taken if it brings the frame count closer to `target`;
    at least one."""
    taken, count = [], 0
    for sequence in order:
        if not taken or abs(count + sizes[sequence] - target) < abs(count - target):
            taken.append(sequence)
            count += sizes[sequence]
    return taken


def cvc_video_split(frames: dict[str, int], seed: int) -> tuple[list[str], list[str], list[str], dict[str, list[int]]]:
    """(train, val, test, {part: sequences}) by whole video sequences: test and val each about 10 % of the frames.

    frames: {case ID: frame number}. Sequences are visited in a seeded order (see seeded_order); test takes
    sequences first, then validation from the rest.
    """
    by_sequence: dict[int, list[str]] = {}
    for case_id, frame in frames.items():
        by_sequence.setdefault(sequence_of(frame), []).append(case_id)
    if len(by_sequence) < 3:
        raise ValueError(f"a split by video needs frames of at least 3 sequences, found {sorted(by_sequence)}")
    sizes = {sequence: len(cases) for sequence, cases in by_sequence.items()}
    order = [int(s) for s in seeded_order([str(s) for s in by_sequence], seed)]
    target = share(len(frames), 1)
    test = _take_sequences(order, sizes, target)
    rest = [s for s in order if s not in test]
    val = _take_sequences(rest[:-1], sizes, target)  # the last one stays for training
    train = [s for s in rest if s not in val]
    parts = [sorted(c for s in part for c in by_sequence[s]) for part in (train, val, test)]
    return parts[0], parts[1], parts[2], {"train": sorted(train), "val": sorted(val), "test": sorted(test)}


def convert_cvc_clinicdb(input_dir: str | Path, output: str | Path | None = None, dataset_id: int = DEFAULT_DATASET_ID,
                         seed: int = 0, resize: int | None = None, overwrite: bool = False,
                         num_workers: int = DEFAULT_NUM_WORKERS, verify: bool = True,
                         split: Split = "random") -> Path:
    """Convert CVC-ClinicDB into `output`/DatasetXXX_CVCClinicDB; returns that folder.

    seed fixes the train/val/test split; split "random" splits frames (the paper's protocol), "video" whole
    video sequences. resize: side of square outputs (bilinear image, nearest mask); None keeps the native 384 x 288.
    """
    if split not in ("random", "video"):
        raise ValueError(f"split must be 'random' or 'video', not {split!r}")
    input_dir = require_dir(Path(input_dir), "the CVC-ClinicDB download")
    image_dir, mask_dir = find_frames(input_dir)
    pairs = pair_by_key(index_files(image_dir, _frame_key), index_files(mask_dir, _frame_key), image_dir, mask_dir)
    if len(pairs) < 10:
        raise ConversionError(f"{image_dir} holds only {len(pairs)} frames; a 10 %/10 % split needs at least 10")
    by_id = {case_id: (image, mask) for case_id, image, mask in pairs}
    if split == "random":
        train, val, test = cvc_split(list(by_id), seed)
        record = {"split": "seeded 10/10/80", "seed": seed}
        rule = "seeded 10% test / 10% val / rest train"
    else:
        frames = {case_id: int(image.stem) for case_id, (image, _) in by_id.items()}
        beyond = sorted(f for f in frames.values() if f > SEQUENCE_FRAMES[-1][1])
        if beyond:
            raise ConversionError(f"{image_dir}: frame {beyond[0]} is not in CVC-ClinicDB's frame -> video table "
                                  f"(frames 1..{SEQUENCE_FRAMES[-1][1]}); remove it or use --split random")
        try:
            train, val, test, sequences = cvc_video_split(frames, seed)
        except ValueError as error:
            raise ConversionError(f"{image_dir}: {error}; use --split random") from None
        record = {"split": "video", "seed": seed, "sequences": sequences}
        rule = "seeded, whole video sequences: about 10% test / 10% val / rest train"
    dest = resolve_dataset_dir(output, dataset_id, DATASET_NAME)

    with atomic_dataset_dir(dest, overwrite, input_dir) as tmp:
        dirs = make_nnunet_dirs(tmp)
        jobs = [(*by_id[c], dirs["imagesTr"] / f"{c}_0000.png", dirs["labelsTr"] / f"{c}.png") for c in train + val]
        jobs += [(*by_id[c], dirs["imagesTs"] / f"{c}_0000.png", dirs["labelsTs"] / f"{c}.png") for c in test]
        parallel_map(partial(convert_image_mask_pair, mask_rule="threshold", resize=resize), jobs, num_workers,
                     "CVC-ClinicDB")
        write_dataset_json(tmp, RGB_CHANNEL_NAMES, LABELS, len(train) + len(val), ".png",
                           "https://polyp.grand-challenge.org/CVCClinicDB/", dataset_name=dest.name,
                           description="CVC-ClinicDB polyp segmentation",
                           conversion={"source": str(image_dir.relative_to(input_dir)),
                                       "split": rule, "seed": seed,
                                       "resize": resize})
        write_splits_final(tmp, [{"train": train, "val": val}])
        write_json(tmp / SPLIT_RECORD, {**record, "train": train, "val": val, "test": test})
        if verify:
            verify_with_nnunet(tmp, dest.name, num_workers)
    return dest


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface of saumamba_convert_cvc."""
    parser = argparse.ArgumentParser(
        prog="saumamba_convert_cvc",
        description="Convert CVC-ClinicDB (TIFF originals, PNG or JPEG mirrors) to an nnU-Net raw dataset with a "
                    "seeded 490/61/61 train/val/test split (or one by whole video sequences).")
    add_common_arguments(parser, DEFAULT_DATASET_ID, DATASET_NAME)
    parser.add_argument("--split", choices=["random", "video"], default="random",
                        help="random (default; the paper's protocol): frames split 10%% test / 10%% val / rest train; "
                             "video: whole video sequences to test and val, about 10%% each, so that near-identical "
                             "neighbouring frames never straddle the split (lower, more honest scores)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    parser.add_argument("--resize", type=positive_int, default=None, metavar="N",
                        help="resize to N x N (the paper trains at 256; bilinear image, nearest mask); "
                             "default: native 384 x 288")
    return parser


def main(argv: list[str] | None = None) -> int:
    """saumamba_convert_cvc; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_cli(lambda: convert_cvc_clinicdb(args.input, args.output, args.dataset_id, args.seed, args.resize,
                                                args.overwrite, args.num_workers, not args.no_verify, args.split),
                   parser.prog)


if __name__ == "__main__":
    sys.exit(main())
