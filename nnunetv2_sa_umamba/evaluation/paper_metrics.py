"""The paper's metrics on nnU-Net prediction folders: `saumamba_evaluate` and `evaluate_folders`.

Protocols (conventions in docs/METRICS.md):
- synapse: TransUNet's per-case, per-organ Dice and HD95 on 3D volumes, averaged over cases then organs.
- isic: VM-UNet's metrics of one confusion matrix pooled over all test pixels.
- cvc: BRAU-Net++'s per-image IoU, Dice, accuracy, precision and recall, averaged over images.
"""
import argparse
import multiprocessing
import os
import sys
import tempfile
from functools import partial
from typing import Dict, List, Optional, Sequence, Tuple, Type

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import isdir, isfile, join, load_json, save_json, subfiles
from nnunetv2.configuration import default_num_processes
from nnunetv2.imageio.base_reader_writer import BaseReaderWriter
from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
from tqdm import tqdm

from nnunetv2_sa_umamba.evaluation.metrics import confusion_counts, cvc_image_metrics, pooled_metrics, synapse_metrics

PROTOCOLS = ("synapse", "isic", "cvc")
SYNAPSE_KEYS = ("Dice", "HD95", "HD95_mm")
ISIC_KEYS = ("mIoU", "DSC", "Acc", "Spe", "Sen")
CVC_KEYS = ("IoU", "Dice", "Acc", "Precision", "Recall")
COUNT_KEYS = ("TP", "FP", "FN", "TN")
# nnU-Net copies the input image's spacing into its prediction; allow float32 header round-off only.
SPACING_RTOL = 1e-4


class EvaluationError(Exception):
    """Bad input to the evaluator; the message names the offending file or folder and the fix."""


def find_dataset_json(prediction_folder: str, reference_folder: str) -> str:
    """dataset.json in the prediction folder (nnUNetv2_predict writes one), else in the reference folder's parent."""
    candidates = [join(prediction_folder, "dataset.json"),
                  join(os.path.dirname(os.path.abspath(reference_folder)), "dataset.json")]
    for candidate in candidates:
        if isfile(candidate):
            return candidate
    raise EvaluationError(f"no dataset.json in {candidates[0]} or {candidates[1]}. "
                          "Fix: pass the dataset's dataset.json with -djfile.")


def load_dataset_json(path: str) -> Tuple[Dict[str, int], str, dict]:
    """Returns ({label name: value}, file_ending, full content) of an nnU-Net dataset.json with integer labels."""
    if not isfile(path):
        raise EvaluationError(f"{path} does not exist. Fix: pass the dataset's dataset.json with -djfile.")
    try:
        content = load_json(path)
    except ValueError as error:
        raise EvaluationError(f"{path} is not valid JSON ({error}). Fix: pass nnU-Net's dataset.json.") from None
    if not isinstance(content, dict) or "labels" not in content or "file_ending" not in content:
        raise EvaluationError(f"{path} lacks 'labels' or 'file_ending'. Fix: pass nnU-Net's dataset.json "
                              "(nnUNet_raw/DatasetXXX_Name/dataset.json).")
    labels = content["labels"]
    if "ignore" in labels:
        raise EvaluationError(f"{path} declares an 'ignore' label; the paper's protocols have none. "
                              "Fix: evaluate with a dataset.json without ignore label.")
    for name, value in labels.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise EvaluationError(f"{path}: label '{name}' is {value!r}, not an integer (region-based datasets "
                                  "are not supported). Fix: use a dataset.json with one integer per label.")
    if 0 not in labels.values():
        raise EvaluationError(f"{path} declares no background label 0. Fix: add \"background\": 0 to 'labels'.")
    return dict(labels), content["file_ending"], content


def select_labels(dataset_labels: Dict[str, int], protocol: str, requested: Optional[Sequence[str]],
                  dataset_json: str = "dataset.json") -> Dict[str, int]:
    """The foreground labels to evaluate, {name: value}.

    `requested` holds label names or integer values from dataset.json. Default: every foreground label
    for synapse; for the binary protocols the only foreground label, or label 1 when there are several.
    """
    foreground = {name: value for name, value in dataset_labels.items() if value != 0}
    if not foreground:
        raise EvaluationError(f"{dataset_json} declares no foreground label. Fix: add the labels to 'labels'.")
    if not requested:
        if protocol == "synapse" or len(foreground) == 1:
            return foreground
        requested = ["1"]
    by_value = {str(value): name for name, value in foreground.items()}
    selected = {}
    for item in requested:
        name = item if item in foreground else by_value.get(item)
        if name is None:
            raise EvaluationError(f"label '{item}' is not a foreground label of {dataset_json} "
                                  f"(foreground labels: {foreground}). Fix: pass names or values from it to --labels.")
        selected[name] = foreground[name]
    return selected


def _check_folders(reference_folder: str, prediction_folder: str) -> None:
    for folder, what in ((reference_folder, "reference"), (prediction_folder, "prediction")):
        if not isdir(folder):
            raise EvaluationError(f"{folder} is not a folder. Fix: pass an existing {what} folder.")


def _check_outputs(outputs: Sequence[str], dataset_json: str, reference_folder: str, prediction_folder: str,
                   file_ending: str) -> None:
    """Before evaluating: refuse an output that would overwrite an input, and one that cannot be written."""
    def inputs_in(folder: str, suffix: str) -> set:
        return {os.path.realpath(f) for f in subfiles(folder, suffix=suffix)}
    inputs = ({os.path.realpath(dataset_json)} | inputs_in(reference_folder, "")
              | inputs_in(prediction_folder, file_ending))
    for output in outputs:
        if os.path.realpath(output) in inputs:
            raise EvaluationError(f"{output} is one of the evaluation's inputs and would be overwritten. Fix: pass "
                                  "another -o (default: PREDICTION_FOLDER/paper_metrics_<protocol>.json).")
        folder = os.path.dirname(os.path.abspath(output))
        if not isdir(folder):
            raise EvaluationError(f"{folder} does not exist or is not a folder, so {output} cannot be written. "
                                  "Fix: create it, or pass another -o.")
        if isdir(output):
            raise EvaluationError(f"{output} is a folder. Fix: pass a file name with -o.")
        try:
            if os.path.exists(output):
                open(output, "a").close()  # appending nothing changes nothing, but needs write access
            else:
                tempfile.TemporaryFile(dir=folder).close()
        except OSError as error:
            raise EvaluationError(f"{output} cannot be written ({error.strerror or error}). Fix: pass a writable "
                                  "location with -o.") from None


def pair_cases(reference_folder: str, prediction_folder: str, file_ending: str,
               allow_missing: bool = False) -> List[Tuple[str, str, str]]:
    """[(case id, reference file, prediction file)] matched by file name, sorted by case id."""
    _check_folders(reference_folder, prediction_folder)
    references = {f[:-len(file_ending)] for f in subfiles(reference_folder, suffix=file_ending, join=False)}
    predictions = {f[:-len(file_ending)] for f in subfiles(prediction_folder, suffix=file_ending, join=False)}
    for folder, cases in ((reference_folder, references), (prediction_folder, predictions)):
        if not cases:
            raise EvaluationError(f"{folder} holds no file ending in '{file_ending}' (dataset.json's file_ending). "
                                  "Fix: check the folder and that dataset.json belongs to this dataset.")
    unmatched = sorted(predictions - references)
    if unmatched:
        raise EvaluationError(f"{prediction_folder}: {len(unmatched)} prediction(s) without a reference in "
                              f"{reference_folder}: {_preview(unmatched)}. Fix: pass the matching reference folder "
                              "(labelsTs for test-set predictions, labelsTr for cross-validation).")
    missing = sorted(references - predictions)
    if missing and not allow_missing:
        raise EvaluationError(f"{prediction_folder}: missing predictions for {len(missing)} case(s) of "
                              f"{reference_folder}: {_preview(missing)}. Fix: predict them, or pass --chill to "
                              "evaluate only the predicted cases (e.g. one cross-validation fold).")
    return [(case, join(reference_folder, case + file_ending), join(prediction_folder, case + file_ending))
            for case in sorted(predictions)]


def _preview(names: Sequence[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


def read_label_map(reader: BaseReaderWriter, path: str, declared_values: Sequence[int],
                   dataset_json: str = "dataset.json") -> Tuple[np.ndarray, Tuple[float, ...]]:
    """A segmentation file as an integer label map and its spacing, both in nnU-Net's axis order.

    Returns an array of shape (X, Y, Z), or (Y, Z) for 2D files (nnU-Net's leading singleton axis and its
    dummy spacing are dropped), and one spacing value per returned axis.
    """
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise EvaluationError(f"{path} is empty (0 bytes). Fix: predict or copy this case again.")
    try:
        seg, properties = reader.read_seg(path)
    except Exception as error:  # noqa: BLE001 - whatever the reader raises, the file cannot be evaluated
        raise EvaluationError(f"{path} cannot be read by {type(reader).__name__} ({_reader_message(error)}). "
                              "Fix: check the file is a valid segmentation in dataset.json's file_ending.") from None
    if seg.shape[0] != 1:
        raise EvaluationError(f"{path} has {seg.shape[0]} channels. Fix: store segmentations as single-channel "
                              "label maps with values 0..K.")
    seg, spacing = seg[0], tuple(float(s) for s in properties["spacing"])
    if seg.shape[0] == 1:
        seg, spacing = seg[0], spacing[1:]
    if not np.issubdtype(seg.dtype, np.integer) and not np.all(np.isfinite(seg) & (seg == np.round(seg))):
        raise EvaluationError(f"{path} holds non-integer values. Fix: pass label maps (nnUNetv2_predict's "
                              "segmentations), not probabilities.")
    # compared before any cast, so that a value beyond int32 is reported as itself
    undeclared = ~np.isin(seg, declared_values)
    if undeclared.any():
        values = [int(v) for v in np.unique(seg[undeclared])]
        raise EvaluationError(f"{path} contains label values {values[:10]} that {dataset_json} does not declare "
                              f"(declared: {sorted(declared_values)}). Fix: pass the dataset.json this data was "
                              "converted with (-djfile), or correct the segmentation.")
    return seg.astype(np.int64), spacing


def _reader_message(error: Exception) -> str:
    """The reader's own complaint, without SimpleITK's source-file location."""
    text = str(error)
    if "sitk::ERROR:" in text:
        text = text.split("sitk::ERROR:", 1)[1]
    return " ".join(text.split()) or type(error).__name__


def evaluate_case(case: Tuple[str, str, str], reader_class: Type[BaseReaderWriter], protocol: str,
                  labels: Dict[str, int], declared_values: Sequence[int], dataset_json: str) -> dict:
    """Metrics of one (case id, reference file, prediction file); the worker of `evaluate_folders`."""
    case_id, reference_file, prediction_file = case
    reader = reader_class()
    ref, ref_spacing = read_label_map(reader, reference_file, declared_values, dataset_json)
    pred, pred_spacing = read_label_map(reader, prediction_file, declared_values, dataset_json)
    if ref.shape != pred.shape:
        raise EvaluationError(f"{prediction_file} has shape {pred.shape} but its reference {reference_file} has "
                              f"{ref.shape}. Fix: evaluate predictions exported at the reference's resolution "
                              "(nnUNetv2_predict does this) against the labels of the same images.")
    if not np.allclose(ref_spacing, pred_spacing, rtol=SPACING_RTOL, atol=0):
        raise EvaluationError(f"{prediction_file} has spacing {pred_spacing} but its reference {reference_file} has "
                              f"{ref_spacing}. Fix: check that the image and label files of this case have the "
                              "same spacing (nnUNetv2_predict copies the image's spacing).")
    result = {"case": case_id, "reference_file": reference_file, "prediction_file": prediction_file,
              "spacing": list(ref_spacing)}
    if protocol == "synapse":
        result["metrics"] = {name: {"label": value, **synapse_metrics(pred == value, ref == value, ref_spacing)}
                             for name, value in labels.items()}
        return result
    foreground = list(labels.values())
    counts = confusion_counts(np.isin(pred, foreground), np.isin(ref, foreground))
    result.update(zip(COUNT_KEYS, counts, strict=True))
    if protocol == "cvc":
        result.update(cvc_image_metrics(*counts))
    return result


def summarise(protocol: str, per_case: List[dict], labels: Dict[str, int]) -> dict:
    """Aggregate per-case results: synapse per-organ means and their mean, isic pooled counts, cvc mean/std."""
    if protocol == "synapse":
        per_label = {}
        for name, value in labels.items():
            rows = [case["metrics"][name] for case in per_case]
            per_label[name] = {"label": value, **{key: float(np.mean([r[key] for r in rows])) for key in SYNAPSE_KEYS},
                               "n_ref_empty": sum(r["n_ref"] == 0 for r in rows),
                               "n_pred_empty": sum(r["n_pred"] == 0 for r in rows)}
        overall = {key: float(np.mean([v[key] for v in per_label.values()])) for key in SYNAPSE_KEYS}
        return {**overall, "per_label": per_label}
    if protocol == "isic":
        counts = {key: sum(case[key] for case in per_case) for key in COUNT_KEYS}
        return {**pooled_metrics(*counts.values()), **counts}
    return {"mean": {key: float(np.mean([case[key] for case in per_case])) for key in CVC_KEYS},
            "std": {key: float(np.std([case[key] for case in per_case])) for key in CVC_KEYS}}


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _pct(value: float) -> str:
    return f"{100 * value:.2f}"


def format_table(result: dict) -> str:
    """The Markdown report of an `evaluate_folders` result: Dice-like metrics in %, HD95 with 2 decimals."""
    summary, n = result["summary"], result["num_cases"]
    labels = ", ".join(f"{name} ({value})" for name, value in result["labels"].items())
    if result["protocol"] == "synapse":
        per_label = summary["per_label"]
        rows = [[f"{name} ({v['label']})", _pct(v["Dice"]), f"{v['HD95']:.2f}", f"{v['HD95_mm']:.2f}"]
                for name, v in per_label.items()]
        rows.append(["**mean**", _pct(summary["Dice"]), f"{summary['HD95']:.2f}", f"{summary['HD95_mm']:.2f}"])
        return "\n\n".join([
            f"Synapse (TransUNet protocol), {n} cases: mean over cases per label, then over labels.",
            _markdown_table(["label", "DSC (%)", "HD95 (voxel)", "HD95 (mm)"], rows),
            "As a row of the paper's Table 1 (DSC %, HD95 in voxels, per-organ DSC %):",
            _markdown_table(["DSC", "HD95", *per_label],
                            [[_pct(summary["Dice"]), f"{summary['HD95']:.2f}",
                              *(_pct(v["Dice"]) for v in per_label.values())]]),
        ])
    if result["protocol"] == "isic":
        return "\n\n".join([
            f"ISIC (VM-UNet protocol): one confusion matrix pooled over the pixels of {n} cases; "
            f"foreground: {labels}.",
            _markdown_table([f"{key} (%)" for key in ISIC_KEYS], [[_pct(summary[key]) for key in ISIC_KEYS]]),
        ])
    return "\n\n".join([
        f"CVC-ClinicDB (BRAU-Net++ protocol): per-image metrics over {n} cases; foreground: {labels}.",
        _markdown_table(["", *(f"{key} (%)" for key in CVC_KEYS)],
                        [[stat, *(_pct(summary[stat][key]) for key in CVC_KEYS)] for stat in ("mean", "std")]),
    ])


def evaluate_folders(reference_folder: str, prediction_folder: str, protocol: str,
                     dataset_json: Optional[str] = None, output_file: Optional[str] = None,
                     labels: Optional[Sequence[str]] = None, num_processes: int = default_num_processes,
                     allow_missing: bool = False) -> dict:
    """Evaluate an nnU-Net prediction folder against its reference folder with one of the paper's protocols.

    Writes the result as JSON to `output_file` (default: paper_metrics_<protocol>.json in the prediction
    folder, next to nnU-Net's summary.json) and the Markdown table next to it (.md), and returns the result:
    {'protocol', 'reference_folder', 'prediction_folder', 'dataset_json', 'labels' {name: value},
    'num_cases', 'summary', 'metric_per_case' [one dict per case]}.
    Raises EvaluationError on bad input.
    """
    if protocol not in PROTOCOLS:
        raise EvaluationError(f"unknown protocol '{protocol}'. Fix: use one of {', '.join(PROTOCOLS)}.")
    _check_folders(reference_folder, prediction_folder)
    dataset_json = dataset_json or find_dataset_json(prediction_folder, reference_folder)
    output_file = output_file or join(prediction_folder, f"paper_metrics_{protocol}.json")
    if not output_file.endswith(".json"):
        raise EvaluationError(f"{output_file}: the output file must end with .json. Fix: rename it.")
    dataset_labels, file_ending, dataset_content = load_dataset_json(dataset_json)
    selected = select_labels(dataset_labels, protocol, labels, dataset_json)
    cases = pair_cases(reference_folder, prediction_folder, file_ending, allow_missing)
    outputs = [output_file, output_file[:-len(".json")] + ".md"]
    _check_outputs(outputs, dataset_json, reference_folder, prediction_folder, file_ending)
    try:
        reader_class = determine_reader_writer_from_dataset_json(dataset_content, cases[0][1], verbose=False)
    except RuntimeError:
        raise EvaluationError(f"no nnU-Net reader opens {cases[0][1]} (file ending '{file_ending}' from "
                              f"{dataset_json}). Fix: check the file and dataset.json's file_ending.") from None
    worker = partial(evaluate_case, reader_class=reader_class, protocol=protocol, labels=selected,
                     declared_values=sorted(dataset_labels.values()), dataset_json=dataset_json)
    progress = partial(tqdm, total=len(cases), desc=f"{protocol} metrics", unit="case")
    num_processes = max(1, min(num_processes, len(cases)))
    if num_processes == 1:
        per_case = [worker(case) for case in progress(cases)]
    else:
        # spawn, as nnU-Net does: forking a process that may hold torch/CUDA state is unsafe.
        with multiprocessing.get_context("spawn").Pool(num_processes) as pool:
            per_case = list(progress(pool.imap(worker, cases)))
    result = {"protocol": protocol, "reference_folder": os.path.abspath(reference_folder),
              "prediction_folder": os.path.abspath(prediction_folder), "dataset_json": os.path.abspath(dataset_json),
              "labels": selected, "num_cases": len(per_case), "summary": summarise(protocol, per_case, selected),
              "metric_per_case": per_case}
    save_json(result, outputs[0], sort_keys=False)
    with open(outputs[1], "w", encoding="utf-8") as handle:
        handle.write(format_table(result) + "\n")
    return result


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console script `saumamba_evaluate`."""
    parser = argparse.ArgumentParser(
        prog="saumamba_evaluate",
        description="The SA-UMamba paper's metrics (Synapse: Dice + HD95; ISIC: pooled mIoU, DSC, Acc, Spe, Sen; "
                    "CVC-ClinicDB: per-image IoU, Dice, Acc, precision, recall) on an nnU-Net prediction folder.")
    parser.add_argument("reference_folder", metavar="REFERENCE_FOLDER",
                        help="folder with the reference segmentations (e.g. labelsTs)")
    parser.add_argument("prediction_folder", metavar="PREDICTION_FOLDER",
                        help="folder with nnU-Net's predicted segmentations")
    parser.add_argument("--protocol", required=True, choices=PROTOCOLS, help="the paper's protocol to apply")
    parser.add_argument("-djfile", default=None, metavar="DATASET_JSON",
                        help="dataset.json (default: the prediction folder's, else the reference folder's parent's)")
    parser.add_argument("-o", default=None, metavar="OUTPUT_JSON",
                        help="output JSON (default: PREDICTION_FOLDER/paper_metrics_<protocol>.json); "
                             "the Markdown table goes next to it as .md")
    parser.add_argument("-np", type=int, default=default_num_processes, metavar="N",
                        help=f"number of worker processes (default: {default_num_processes})")
    parser.add_argument("--labels", nargs="+", default=None, metavar="LABEL",
                        help="label names or values to evaluate (default: all foreground labels for synapse; "
                             "the only foreground label, else label 1, for isic and cvc, where several form "
                             "one foreground)")
    parser.add_argument("--chill", action="store_true",
                        help="evaluate only the predicted cases when some references have no prediction")
    args = parser.parse_args(argv)
    try:
        result = evaluate_folders(args.reference_folder, args.prediction_folder, args.protocol, args.djfile, args.o,
                                  args.labels, args.np, args.chill)
    except EvaluationError as error:
        sys.exit(f"saumamba_evaluate: error: {error}")
    print(format_table(result))


if __name__ == "__main__":
    main()
