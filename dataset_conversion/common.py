"""Helpers shared by the dataset converters.

Everything a converter needs besides knowing its dataset's layout: the error type, finding folders,
pairing images with masks, reading and validating 2D images and masks, seeded splits, a parallel map
with a progress bar, the atomic dataset writer, nnU-Net's dataset.json / splits_final.json and its
integrity check, and the command-line plumbing.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import signal
import socket
import stat
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
from PIL import Image
from tqdm import tqdm

T = TypeVar("T")
R = TypeVar("R")

DEFAULT_NUM_WORKERS = min(8, os.cpu_count() or 1)
RGB_CHANNEL_NAMES = {"0": "R", "1": "G", "2": "B"}
SPLIT_RECORD = "conversion_split.json"
# Files that file managers and archivers leave behind; never part of a dataset.
_JUNK_FILES = {"thumbs.db", "desktop.ini"}

MaskRule = Literal["exact", "threshold"]


class ConversionError(Exception):
    """Bad input. The message names the offending file or folder and says how to fix it."""


# ----------------------------------------------------------------------------------------- folders

def normalise_name(name: str) -> str:
    """Folder name compared ignoring case, spaces, '_' and '-' ("Ground Truth" == "ground_truth")."""
    return re.sub(r"[\s_\-]+", "", name).casefold()


def is_ignorable(path: Path) -> bool:
    """Hidden files (.DS_Store, ._x) and OS thumbnails, which are skipped everywhere."""
    return path.name.startswith(".") or path.name.casefold() in _JUNK_FILES


def require_dir(path: Path, what: str) -> Path:
    """`path` if it is a folder, else a ConversionError describing `what` should be there."""
    if not path.is_dir():
        raise ConversionError(f"{path} does not exist or is not a folder; it should hold {what}")
    return path


def find_child_dir(parent: Path, names: Iterable[str]) -> Path | None:
    """The sub-folder of `parent` whose name matches one of `names` (see normalise_name), or None."""
    wanted = {normalise_name(n) for n in names}
    matches = sorted(p for p in parent.iterdir()
                     if p.is_dir() and not is_ignorable(p) and normalise_name(p.name) in wanted)
    if len(matches) > 1:
        raise ConversionError(f"{parent} holds several folders that could be meant "
                              f"({', '.join(m.name for m in matches)}); keep only one of them")
    return matches[0] if matches else None


def unwrap_same_name(folder: Path) -> Path:
    """`folder`, or its only child of the same name (archives extracted into a folder named after them)."""
    children = [p for p in folder.iterdir() if not is_ignorable(p)]
    if len(children) == 1 and children[0].is_dir() and normalise_name(children[0].name) == normalise_name(folder.name):
        return children[0]
    return folder


def walk_dirs(root: Path, max_depth: int) -> Iterator[Path]:
    """`root` and its sub-folders down to `max_depth` levels, breadth first, sorted, hidden ones skipped."""
    level = [root]
    for _ in range(max_depth + 1):
        yield from level
        level = sorted(c for d in level for c in d.iterdir() if c.is_dir() and not is_ignorable(c))


def index_files(folder: Path, key_of: Callable[[Path], str | None]) -> dict[str, Path]:
    """Map key -> file for the files of `folder`.

    key_of returns a file's case key, None to skip the file, or raises ConversionError for a file that
    should not be there. Two files with one key are an error.
    """
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or is_ignorable(path):
            continue
        key = key_of(path)
        if key is None:
            continue
        if key in found:
            raise ConversionError(f"{path} and {found[key]} are the same case ({key}); remove one of them")
        found[key] = path
    return found


def pair_by_key(images: Mapping[str, Path], masks: Mapping[str, Path], image_dir: Path, mask_dir: Path,
                nouns: tuple[str, str] = ("image", "mask")) -> list[tuple[str, Path, Path]]:
    """[(key, image, mask)] sorted by key; an image without mask or a mask without image is an error.

    nouns: what the two kinds of file are called in messages.
    """
    image, mask = nouns
    no_mask = sorted(set(images) - set(masks))
    if no_mask:
        raise ConversionError(f"{images[no_mask[0]]} has no {mask} in {mask_dir} ({len(no_mask)} {image}(s) without "
                              f"{mask} in all); restore the missing {mask}(s) or remove the {image}(s)")
    no_image = sorted(set(masks) - set(images))
    if no_image:
        raise ConversionError(f"{masks[no_image[0]]} has no {image} in {image_dir} ({len(no_image)} {mask}(s) "
                              f"without {image} in all); restore the missing {image}(s) or remove the {mask}(s)")
    if not images:
        raise ConversionError(f"{image_dir} holds no images; point the converter at the dataset's root folder")
    return [(k, images[k], masks[k]) for k in sorted(images)]


# -------------------------------------------------------------------------------- images and masks

def _open_image(path: Path) -> Image.Image:
    """Open and fully decode an image, so that truncated files fail here, naming the file."""
    try:
        with warnings.catch_warnings():
            # PIL warns before raising on a truncated TIFF; the error below says it better
            warnings.filterwarnings("ignore", message="Truncated File Read")
            image = Image.open(path)
            image.load()
    except MemoryError:
        raise
    except Exception as error:  # any decoder failure means the file itself is bad
        raise ConversionError(f"{path}: unreadable or truncated image ({error}); "
                              f"re-download or re-extract this file") from error
    return image


def read_rgb(path: Path) -> np.ndarray:
    """An 8-bit image as RGB: (H, W, 3) uint8. Greyscale is repeated, alpha dropped."""
    with _open_image(path) as image:
        if image.mode not in {"RGB", "RGBA", "L", "LA", "P", "CMYK", "YCbCr", "1"}:
            raise ConversionError(f"{path}: image mode {image.mode!r} is not 8-bit colour or greyscale; "
                                  f"re-export it as an 8-bit RGB image")
        return np.asarray(image.convert("RGB"))


def read_mask(path: Path) -> np.ndarray:
    """An 8-bit mask: (H, W) uint8. Colour masks keep their first channel; 1-bit masks become {0, 255}."""
    with _open_image(path) as image:
        if image.mode in {"RGB", "RGBA"}:
            return np.asarray(image)[..., 0]
        if image.mode in {"L", "LA", "P", "1"}:
            return np.asarray(image.convert("L"))
        raise ConversionError(f"{path}: mask mode {image.mode!r} is not an 8-bit mask; "
                              f"re-export it as an 8-bit greyscale image")


def binarize_mask(mask: np.ndarray, path: Path, rule: MaskRule) -> np.ndarray:
    """(H, W) uint8 mask -> (H, W) uint8 in {0, 1}.

    rule "exact": the mask may hold only 0 and 255 (ISIC). rule "threshold": foreground is > 127
    (CVC-ClinicDB); a non-empty mask that thresholding would empty (e.g. one stored as 0/1) is an error.
    """
    if rule == "exact":
        values = np.unique(mask)
        unexpected = values[(values != 0) & (values != 255)]
        if unexpected.size:
            shown = ", ".join(str(v) for v in unexpected[:5])
            raise ConversionError(f"{path}: mask holds values {shown}{' ...' if unexpected.size > 5 else ''} but only "
                                  f"0 and 255 are allowed; use the original ground-truth PNG, not a resized or "
                                  f"re-compressed copy")
        return (mask == 255).astype(np.uint8)
    if rule == "threshold":
        binary = (mask > 127).astype(np.uint8)
        peak = int(mask.max())
        if 0 < peak <= 127:
            raise ConversionError(f"{path}: largest mask value is {peak}, so the >127 threshold would leave it empty; "
                                  f"expected an 8-bit 0..255 mask (a 0/1 mask must be multiplied by 255)")
        return binary
    raise ValueError(f"unknown mask rule {rule!r}")


def convert_image_mask_pair(job: tuple[Path, Path, Path, Path], mask_rule: MaskRule,
                            resize: int | None = None) -> tuple[int, int]:
    """Write one 2D case for nnU-Net: the image as RGB PNG, the mask as a {0, 1} uint8 PNG.

    job: (image in, mask in, image PNG out, mask PNG out). resize: side of a square output, image
    resampled bilinearly, mask by nearest neighbour; None keeps the native size.
    Returns the source (height, width).
    """
    image_path, mask_path, image_out, mask_out = job
    rgb = read_rgb(image_path)
    mask = binarize_mask(read_mask(mask_path), mask_path, mask_rule)
    if rgb.shape[:2] != mask.shape:
        raise ConversionError(f"{mask_path} is {mask.shape[1]}x{mask.shape[0]} pixels but its image {image_path} "
                              f"is {rgb.shape[1]}x{rgb.shape[0]}; they must be the same size")
    image, label = Image.fromarray(rgb, "RGB"), Image.fromarray(mask, "L")
    if resize is not None:
        image = image.resize((resize, resize), Image.Resampling.BILINEAR)
        label = label.resize((resize, resize), Image.Resampling.NEAREST)
    image.save(image_out, format="PNG")
    label.save(mask_out, format="PNG")
    return rgb.shape[0], rgb.shape[1]


# ------------------------------------------------------------------------------------------ splits

def seeded_order(case_ids: Iterable[str], seed: int) -> list[str]:
    """The case IDs in a pseudo-random order fixed by `seed`.

    Sorted by SHA-256 of "seed:case_id", so the order depends on neither the input order nor the
    numpy/Python version.
    """
    return sorted(case_ids, key=lambda c: hashlib.sha256(f"{seed}:{c}".encode()).hexdigest())


def seeded_partition(case_ids: Sequence[str], seed: int, sizes: Sequence[int]) -> list[list[str]]:
    """Split the case IDs into consecutive chunks of `sizes` of their seeded order; each chunk sorted."""
    if len(set(case_ids)) != len(case_ids):
        raise ValueError("case IDs must be unique")
    if sum(sizes) != len(case_ids) or min(sizes) < 0:
        raise ValueError(f"sizes {list(sizes)} do not partition {len(case_ids)} cases")
    order = seeded_order(case_ids, seed)
    bounds = np.cumsum([0, *sizes])
    return [sorted(order[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def share(n: int, tenths: int) -> int:
    """round(n * tenths / 10), halves rounded up, in integer arithmetic."""
    return (n * tenths + 5) // 10


# ---------------------------------------------------------------------------------------- parallel

def parallel_map(fn: Callable[[T], R], items: Sequence[T], num_workers: int, desc: str) -> list[R]:
    """[fn(item) for item in items] with a progress bar, in input order.

    With num_workers > 1, fn and items must be picklable; each worker takes one item at a time, so
    memory stays at about num_workers items. The first error stops the pool and is re-raised.
    """
    if num_workers <= 1 or len(items) <= 1:
        return [fn(item) for item in tqdm(items, desc=desc, disable=None)]
    # spawn: forking a process that runs threads (tqdm, SimpleITK, torch) can deadlock
    context = multiprocessing.get_context("spawn")
    with context.Pool(min(num_workers, len(items))) as pool:
        return list(tqdm(pool.imap(fn, items, chunksize=1), total=len(items), desc=desc, disable=None))


# ----------------------------------------------------------------------------------- dataset folder

def dataset_dir_name(dataset_id: int, name: str) -> str:
    """nnU-Net's folder name, e.g. Dataset801_Synapse."""
    if not 1 <= dataset_id <= 999:
        raise ConversionError(f"dataset ID {dataset_id} is outside 1..999; pass another -d/--dataset-id")
    return f"Dataset{dataset_id:03d}_{name}"


def resolve_dataset_dir(output: str | os.PathLike | None, dataset_id: int, name: str) -> Path:
    """The folder to create: `output`/DatasetXXX_Name, where `output` defaults to $nnUNet_raw.

    Another folder already using the same ID there is an error, since nnU-Net could not tell them apart.
    """
    if output is None:
        raw = os.environ.get("nnUNet_raw")
        if not raw:
            raise ConversionError("nnUNet_raw is not set: export nnUNet_raw=/path/to/nnUNet_raw "
                                  "or pass -o/--output FOLDER")
        output = raw
    output = Path(output)
    folder = dataset_dir_name(dataset_id, name)
    if output.exists() and not output.is_dir():
        raise ConversionError(f"{output} is a file; -o/--output must be a folder")
    if output.is_dir():
        prefix = f"Dataset{dataset_id:03d}_"
        clashes = sorted(p for p in output.iterdir() if p.name.startswith(prefix) and p.name != folder)
        if clashes:
            raise ConversionError(f"{clashes[0]} already uses dataset ID {dataset_id} and nnU-Net needs unique IDs; "
                                  f"pass another -d/--dataset-id or move that folder away")
    return output / folder


# written into the build folder; a leftover folder is only deleted when it carries this and its process is gone
_OWNER_FILE = ".saumamba_conversion.json"


def _check_destination(dest: Path, overwrite: bool, source: Path | None) -> None:
    """Refuse, before anything is written, a destination whose replacement would lose data."""
    if dest.is_symlink():
        raise ConversionError(f"{dest} is a symbolic link; --overwrite would replace the link, not the folder it "
                              f"points to. Remove the link or pass its target's parent as -o/--output")
    if dest.exists() and not (overwrite and dest.is_dir()):
        raise ConversionError(f"{dest} already exists; pass --overwrite to replace it" if dest.is_dir()
                              else f"{dest} is a file; move it away")
    if source is not None:
        source, target = source.resolve(), dest.resolve()
        if source == target or target in source.parents:
            raise ConversionError(f"the input {source} lies inside the dataset folder {target}, which the "
                                  f"conversion would replace; move the download elsewhere or pass another "
                                  f"-o/--output or -d/--dataset-id")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _remove_stale_leftovers(dest: Path) -> None:
    """Delete build (.partial-*) and replaced (.old-*) folders of `dest` that a killed run left behind.

    Only folders holding our owner file, written on this host by a process that no longer runs, are ours.
    """
    leftovers = [p for kind in ("partial", "old") for p in sorted(dest.parent.glob(f".{dest.name}.{kind}-*"))]
    for leftover in leftovers:
        owner_file = leftover / _OWNER_FILE
        if leftover.is_symlink() or not owner_file.is_file():
            continue
        try:
            owner = json.loads(owner_file.read_text(encoding="utf-8"))
            ours = owner["host"] == socket.gethostname() and not _process_alive(int(owner["pid"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if ours:
            print(f"Removing {leftover}, left behind by an interrupted conversion", file=sys.stderr)
            _rmtree(leftover)


def _rmtree(path: Path) -> None:
    """shutil.rmtree that also deletes read-only entries (extracted archives often are), as --overwrite asks."""
    def make_writable_and_retry(function: Callable, name: str, *_: Any) -> None:
        os.chmod(os.path.dirname(name), stat.S_IRWXU)
        if not os.path.islink(name) and os.path.isdir(name):
            os.chmod(name, stat.S_IRWXU)
        function(name)
    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=make_writable_and_retry)
    else:
        shutil.rmtree(path, onerror=make_writable_and_retry)


def _make_parents(folder: Path) -> list[Path]:
    """mkdir -p `folder`; returns the folders created, deepest first, so that a failed run can remove them."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        _remove_empty(missing)
        raise ConversionError(f"cannot create the output folder {folder} ({error.strerror or error}); "
                              f"pass a writable folder as -o/--output") from error
    return missing


@contextlib.contextmanager
def atomic_dataset_dir(dest: Path, overwrite: bool, source: Path | None = None) -> Iterator[Path]:
    """Yield an empty folder beside `dest` to build the dataset in; it becomes `dest` only if the block
    completes, and is deleted otherwise. An existing `dest` is an error unless `overwrite`, in which
    case it is replaced only once the new dataset is complete. `source` (the input folder) may not lie
    inside `dest`. Output folders this call created are removed again if the block fails."""
    dest = Path(dest)
    _check_destination(dest, overwrite, source)
    created = _make_parents(dest.parent)
    _remove_stale_leftovers(dest)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    except OSError as error:
        _remove_empty(created)
        raise ConversionError(f"cannot write into {dest.parent} ({error.strerror or error}); "
                              f"pass a writable folder as -o/--output") from error
    try:
        _write_owner(tmp)
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the dataset should not be
        yield tmp
        (tmp / _OWNER_FILE).unlink()
        _move_into_place(tmp, dest, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise


def _remove_empty(folders: Sequence[Path]) -> None:
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


def _move_into_place(tmp: Path, dest: Path, overwrite: bool) -> None:
    if not dest.exists():
        tmp.rename(dest)
        return
    if not overwrite:
        raise ConversionError(f"{dest} appeared while converting; pass --overwrite to replace it")
    old = tmp.with_name(tmp.name.replace(".partial-", ".old-"))
    # marked as ours before the rename, so that the copy a killed run leaves behind is cleaned up next time
    with contextlib.suppress(OSError):
        _write_owner(dest)
    dest.rename(old)
    try:
        tmp.rename(dest)
    except BaseException:
        old.rename(dest)
        (dest / _OWNER_FILE).unlink(missing_ok=True)
        raise
    try:
        _rmtree(old)
    except OSError as error:
        print(f"warning: the new dataset is complete in {dest}, but the old one could not be fully deleted "
              f"({error}); delete {old} yourself", file=sys.stderr)


def _write_owner(folder: Path) -> None:
    write_json(folder / _OWNER_FILE, {"pid": os.getpid(), "host": socket.gethostname()})


def make_nnunet_dirs(folder: Path, with_test: bool = True) -> dict[str, Path]:
    """Create imagesTr/labelsTr (and imagesTs/labelsTs) in `folder`; returns them by name."""
    names = ["imagesTr", "labelsTr"] + (["imagesTs", "labelsTs"] if with_test else [])
    dirs = {n: folder / n for n in names}
    for d in dirs.values():
        d.mkdir()
    return dirs


def write_json(path: Path, content: Any) -> None:
    """Write `content` as indented JSON."""
    path.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")


def write_splits_final(folder: Path, splits: Sequence[Mapping[str, Sequence[str]]]) -> None:
    """nnU-Net's splits_final.json: one {"train": [...], "val": [...]} per fold."""
    for fold, split in enumerate(splits):
        overlap = set(split["train"]) & set(split["val"])
        if overlap:
            raise ValueError(f"fold {fold}: cases {sorted(overlap)[:3]} are in both train and val")
    write_json(folder / "splits_final.json", [{"train": list(s["train"]), "val": list(s["val"])} for s in splits])


def write_dataset_json(folder: Path, channel_names: dict[str, str], labels: dict[str, int],
                       num_training: int, file_ending: str, reference: str, **extra: Any) -> None:
    """dataset.json through nnU-Net's own generate_dataset_json; `extra` keys are stored as given."""
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
    generate_dataset_json(str(folder), dict(channel_names), dict(labels), num_training, file_ending,
                          reference=reference, license=f"see the terms of use at {reference}",
                          converted_by="nnunetv2-sa-umamba dataset_conversion", **extra)


def verify_with_nnunet(folder: Path, dataset_name: str, num_workers: int) -> None:
    """Run nnU-Net's verify_dataset_integrity on the finished folder; a failure is a ConversionError."""
    # imported here: it pulls in torch, which the converters themselves do not need
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    try:
        verify_dataset_integrity(str(folder), max(1, num_workers))
    except (AssertionError, RuntimeError, FileNotFoundError) as error:
        raise ConversionError(f"nnU-Net's verify_dataset_integrity rejected the converted {dataset_name} "
                              f"(details above): {error}. Nothing was written; please report this as a "
                              f"converter bug") from error


# --------------------------------------------------------------------------------------------- CLI

def add_common_arguments(parser: argparse.ArgumentParser, default_id: int, name: str) -> None:
    """-i, -d, -o, --overwrite, -np and --no-verify, shared by every converter's CLI."""
    parser.add_argument("-i", "--input", type=Path, required=True,
                        help="folder holding the downloaded dataset (see docs/DATASETS.md)")
    parser.add_argument("-d", "--dataset-id", type=int, default=default_id,
                        help=f"nnU-Net dataset ID (default {default_id}: Dataset{default_id:03d}_{name})")
    parser.add_argument("-o", "--output", type=Path, default=None,
                        help="folder to create the dataset folder in (default: $nnUNet_raw)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing dataset folder of the same name")
    parser.add_argument("-np", "--num-workers", type=int, default=DEFAULT_NUM_WORKERS,
                        help=f"parallel worker processes (default {DEFAULT_NUM_WORKERS})")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip nnU-Net's verify_dataset_integrity on the result")


def positive_int(text: str) -> int:
    """argparse type for a positive integer."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def run_cli(convert: Callable[[], Path], prog: str) -> int:
    """Run a conversion; bad input is printed as one line on stderr, `prog: error: ...` as argparse prints
    its own errors, with exit code 1. SIGTERM (a killed job) cleans up like Ctrl-C."""
    def terminate(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)
    in_main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    previous = signal.signal(signal.SIGTERM, terminate) if in_main_thread else None
    try:
        dest = convert()
    except ConversionError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 1
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    print(f"Wrote {dest}")
    return 0
