"""Checkpoint interchange with the reference implementation (VM-UNet-style key names) and VMamba v0
ImageNet initialisation.

Key remapping is done by pure functions on state dicts (testable without files); file loading is safe:
``torch.load(..., weights_only=True)``, and the only non-tensor objects that the known formats pickle (the
yacs config that VMamba's training script stores next to the weights, read as a plain OrderedDict, and the
numpy float scalars in nnU-Net's and the released scripts' logging entries) are allow-listed one by one, so
no third-party code runs while unpickling.

Released SA-UMamba / VM-UNet checkpoints -> an nnU-Net ``-pretrained_weights`` file:
``python -m nnunetv2_sa_umamba.checkpoints best.pth pretrained.pth [--in-channels 1] [--num-classes N]``.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

# Name prefixes as templates, reference -> ours; {i}, {j} are stage and block indices.
_BLOCK_PARTS = [
    ("ln_1.", "norm1."),
    ("self_attention.", "ss2d."),
    ("skip_scale2", "scale2"),
    ("skip_scale", "scale1"),
    ("ln_2.", "norm2."),
    ("conv_blk.cab.0.get_weight.1.", "rfac.weight_conv."),
    ("conv_blk.cab.0.generate_feature.0.", "rfac.feature_conv."),
    ("conv_blk.cab.0.generate_feature.1.", "rfac.feature_norm."),
    ("conv_blk.cab.0.conv.0.", "rfac.out_conv."),
    ("conv_blk.cab.0.conv.1.", "rfac.out_norm."),
]
_PREFIXES = [
    (f"{reference_stage}.{{i}}.blocks.{{j}}.{reference_part}", f"{our_stage}.{{i}}.blocks.{{j}}.{our_part}")
    for reference_stage, our_stage in (("layers", "encoder_stages"), ("layers_up", "decoder_stages"))
    for reference_part, our_part in _BLOCK_PARTS
] + [
    ("layers.{i}.downsample.", "encoder_stages.{i}.downsample."),
    ("layers_up.{i}.upsample.", "decoder_stages.{i}.upsample."),
    ("final_up.", "final_expand."),
    ("final_conv.", "head."),
    ("patch_embed.", "patch_embed."),
]
# modules the released code builds but never runs, and ours that it does not have
_REFERENCE_UNUSED = re.compile(r"^(iaffs\.|layers_up\.\d+\.new_upsample\.)")
_OURS_ONLY = re.compile(r"^deep_supervision_heads\.")


def _template_regex(template: str) -> re.Pattern:
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{j\}", r"(?P<j>\d+)")
    return re.compile("^" + pattern)


_RULES = {
    "to_ours": [(_template_regex(ref), ours) for ref, ours in _PREFIXES],
    "to_reference": [(_template_regex(ours), ref) for ref, ours in _PREFIXES],
}


def _rename(key: str, direction: str) -> str | None:
    for pattern, template in _RULES[direction]:
        match = pattern.match(key)
        if match:
            return template.format(**match.groupdict()) + key[match.end():]
    return None


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read safely, or that does not fit the model."""


def _rename_state_dict(state_dict: Mapping[str, torch.Tensor], direction: str, dropped: re.Pattern,
                       unknown_message: str) -> dict[str, torch.Tensor]:
    out, unknown = {}, []
    for key, value in state_dict.items():
        if dropped.match(key):
            continue
        renamed = _rename(key, direction)
        if renamed is None:
            unknown.append(key)
        else:
            out[renamed] = value
    if unknown:
        raise CheckpointError(f"{len(unknown)} keys {unknown_message}, e.g. {unknown[:5]}")
    return out


# wrappers of the released training scripts: DataParallel/DDP ('module.') around VM-UNet's 'vmunet.' attribute
_WRAPPER_PREFIXES = ("module.", "vmunet.")


def strip_wrapper_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove the prefixes that wrappers add to every key: ``module.`` (DataParallel) and ``vmunet.`` (the released
    train.py / train_synapse.py save ``VMUNet.state_dict()``, whose network is its ``vmunet`` attribute)."""
    state_dict = dict(state_dict)
    for prefix in _WRAPPER_PREFIXES:
        if state_dict and all(key.startswith(prefix) for key in state_dict):
            state_dict = {key[len(prefix):]: value for key, value in state_dict.items()}
    return state_dict


def reference_to_ours(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Reference (official SA-UMamba / VM-UNet) key names -> ours, with or without the released scripts'
    ``vmunet.`` / ``module.`` prefixes. Unused reference modules (iAFF, DySample) are dropped; a key that matches no
    rule raises ``CheckpointError`` so that a foreign checkpoint is never half-read."""
    return _rename_state_dict(strip_wrapper_prefixes(state_dict), "to_ours", _REFERENCE_UNUSED,
                              "are not in the SA-UMamba/VM-UNet reference naming")


def ours_to_reference(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our key names -> the reference naming. Deep-supervision heads have no reference counterpart and are
    left out."""
    return _rename_state_dict(state_dict, "to_reference", _OURS_ONLY, "have no reference name")


def _numpy_scalar_globals() -> list:
    """The numpy globals that pickled float32/float64 scalars need (nnU-Net's 'logging' entries, the released
    scripts' 'loss'), under the module names of numpy 1 and 2; other dtypes (object arrays) stay refused."""
    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    return [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"), np.dtype,
            np.dtypes.Float32DType, np.dtypes.Float64DType]


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _failure_message(path: str, error: Exception) -> str:
    """Why torch.load failed, in one line: for a refused pickle torch's line naming what was blocked (its advice
    and colour codes dropped), otherwise the error of the damaged or foreign file."""
    text = _ANSI.sub("", str(error)).strip()
    if "Weights only load failed" in text:
        if "WeightsUnpickler error:" in text:
            text = text.split("WeightsUnpickler error:", 1)[1].split(" Please use", 1)[0]
        reason = " ".join(text.strip().splitlines()[0].split()).rstrip(".") if text.strip() else "refused"
        return (f"{path} cannot be loaded safely (weights only): {reason}. It pickles objects other than tensors and "
                f"the known formats' plain data. Re-save only its tensors (torch.save(model.state_dict(), ...)) "
                f"in a trusted environment.")
    reason = " ".join(text.splitlines()[0].split()) if text else ""
    return (f"{path} is not a readable PyTorch checkpoint ({type(error).__name__}{': ' + reason if reason else ''}); "
            f"it is truncated or another kind of file: download or save it again")


# wrappers around the state dict: VMamba ('model'), generic ('state_dict'), the released scripts' latest.pth
# ('model_state_dict') and nnU-Net ('network_weights')
_WRAPPERS = ("model", "state_dict", "model_state_dict", "network_weights")


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint without running pickled code. Accepts a bare state dict or one wrapped under
    'model', 'state_dict', 'model_state_dict' (the released scripts' latest.pth) or 'network_weights' (nnU-Net).
    Any file that is not such a checkpoint raises ``CheckpointError`` naming it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path} is empty (0 bytes); download or save the checkpoint again")
    try:
        with torch.serialization.safe_globals([(collections.OrderedDict, "yacs.config.CfgNode"),
                                               *_numpy_scalar_globals()]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - any unpickling or format failure: not a usable checkpoint
        raise CheckpointError(_failure_message(path, error)) from None
    for wrapper in _WRAPPERS:
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(wrapper), dict):
            checkpoint = checkpoint[wrapper]
            break
    if not isinstance(checkpoint, dict) or not checkpoint or \
            not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in checkpoint.items()):
        raise CheckpointError(f"{path} does not hold a state dict (name -> tensor)")
    return dict(checkpoint)


@dataclass
class LoadReport:
    """What a checkpoint load did: model keys filled, checkpoint keys skipped with the reason, and model keys
    left at their initialisation."""
    loaded: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # modules the released code builds but never runs

    def summary(self) -> str:
        return (f"loaded {len(self.loaded)} tensors, skipped {len(self.skipped)} checkpoint tensors, "
                f"ignored {len(self.ignored)} tensors of unused modules, "
                f"{len(self.missing)} model tensors left at initialisation")


def _fill(model_state: dict[str, torch.Tensor], candidates: Mapping[str, tuple[str, torch.Tensor]],
          report: LoadReport,
          adapt: Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor | None] | None = None) -> None:
    """Copy ``candidates`` (model key -> (checkpoint key, tensor)) into ``model_state``; the report names
    checkpoint keys, as the user sees them in their file."""
    for key, (source_key, value) in candidates.items():
        if key not in model_state:
            report.skipped[source_key] = "no such tensor in the model"
            continue
        target = model_state[key]
        if value.shape != target.shape and adapt is not None:
            value = adapt(key, value, target)
        if value is None or value.shape != target.shape:
            report.skipped[source_key] = f"shape {tuple(candidates[key][1].shape)} != model {tuple(target.shape)}"
            continue
        model_state[key] = value.to(target.dtype)
        if key not in report.loaded:
            report.loaded.append(key)


def load_reference_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                           strict: bool = True) -> LoadReport:
    """Load a state dict (not a file: see ``load_reference_checkpoint``) in the reference naming (official
    SA-UMamba / VM-UNet, with or without the released scripts' ``vmunet.`` prefix) into ``model``. RGB
    patch-embed filters are summed for a 1-channel model (the released code repeats grey images to 3 channels:
    the same output). With ``strict``, any shape mismatch or model tensor left unfilled (deep-supervision heads
    excepted) raises ``CheckpointError``."""
    state_dict = strip_wrapper_prefixes(state_dict)
    model_state = model.state_dict()
    report = LoadReport(ignored=[k for k in state_dict if _REFERENCE_UNUSED.match(k)])
    renamed = reference_to_ours(state_dict)
    sources = {_rename(k, "to_ours"): k for k in state_dict if not _REFERENCE_UNUSED.match(k)}
    _fill(model_state, {k: (sources[k], v) for k, v in renamed.items()}, report, adapt=_sum_input_channels)
    report.missing = [k for k in model_state if k not in report.loaded]
    not_filled = [k for k in report.missing if not k.startswith("deep_supervision_heads.")]
    if strict and (report.skipped or not_filled):
        raise CheckpointError(
            "checkpoint does not fit the model: "
            + "; ".join([f"{k}: {why}" for k, why in list(report.skipped.items())[:5]] + not_filled[:5])
            + ". Build the model with the checkpoint's configuration (classes, input channels, ablation switches).")
    model.load_state_dict(model_state)
    return report


def load_reference_checkpoint(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> LoadReport:
    """``load_state_dict_file`` + ``load_reference_weights``: a checkpoint file of the released SA-UMamba / VM-UNet
    training scripts (best.pth, latest.pth) into ``model``; errors name the file."""
    state_dict = load_state_dict_file(path)
    try:
        return load_reference_weights(model, state_dict, strict)
    except CheckpointError as error:
        raise CheckpointError(f"{os.fspath(path)}: {error}") from None


_VMAMBA_ENCODER_TO_DECODER = {0: 3, 1: 2, 2: 1, 3: 0}


def _sum_input_channels(key: str, value: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
    """RGB patch-embed filters for a 1-channel model: summing them equals repeating the image to 3 channels,
    which is what VM-UNet does for grey-scale input."""
    if key == "patch_embed.proj.weight" and target.shape[1] == 1 and value.shape[1] == 3:
        return value.sum(dim=1, keepdim=True)
    return None


def load_vmamba_pretrained(model: nn.Module, path: str | os.PathLike) -> LoadReport:
    """Initialise ``model`` from a VMamba v0 ImageNet checkpoint (e.g. ``vmamba_small_e238_ema.pth``) on local
    disk. Pass 1 fills the encoder (patch embed, stages, merging); pass 2 fills the decoder's blocks from the
    encoder stages of matching width (layers.0 -> layers_up.3, ..., layers.3 -> layers_up.0). Checkpoint blocks
    beyond the model's depth, classifier heads and mismatched shapes are skipped and reported."""
    state_dict = load_state_dict_file(path)
    model_state = model.state_dict()
    report = LoadReport()

    encoder = {}
    for key, value in state_dict.items():
        renamed = _rename(key, "to_ours") if key.startswith(("patch_embed.", "layers.")) else None
        if renamed is None:
            report.skipped[key] = "not part of the SA-UMamba encoder (classifier head or unknown)"
        else:
            encoder[renamed] = (key, value)
    _fill(model_state, encoder, report, adapt=_sum_input_channels)

    decoder = {}
    block = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.(ln_1\.|self_attention\.)(.*)$")
    for key, value in state_dict.items():
        match = block.match(key)
        if match:
            stage, index, part, rest = match.groups()
            up = _VMAMBA_ENCODER_TO_DECODER.get(int(stage))
            if up is not None:
                decoder[_rename(f"layers_up.{up}.blocks.{index}.{part}{rest}", "to_ours")] = (key, value)
    _fill(model_state, decoder, report)

    report.missing = [k for k in model_state if k not in report.loaded]
    if not report.loaded:
        raise CheckpointError(f"{path}: no tensor matches the model; is it a VMamba v0 checkpoint?")
    model.load_state_dict(model_state)
    return report


def reference_architecture(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """The SAUMamba switches a reference checkpoint was trained with: SA-UMamba (RFAC and residual scales) or
    VM-UNet (neither), and RSSS or VSS decoder blocks."""
    keys = list(strip_wrapper_prefixes(state_dict))
    rsss_decoder = re.compile(r"^layers_up\.\d+\.blocks\.\d+\.(skip_scale|conv_blk\.|ln_2\.)")
    return {"rfac": any(".conv_blk." in k for k in keys),
            "residual_scale": any(k.endswith(".skip_scale") for k in keys),
            "decoder_block": "rsss" if any(rsss_decoder.match(k) for k in keys) else "vss"}


def reference_to_nnunet(state_dict: Mapping[str, torch.Tensor], in_channels: int = 3,
                        num_classes: int | None = None, **architecture) -> tuple[dict, LoadReport]:
    """A released SA-UMamba / VM-UNet state dict -> the content of an nnU-Net ``-pretrained_weights`` file
    (``{'network_weights': ...}`` with every tensor of the network nnU-Net builds) and the load report.

    num_classes: nnU-Net's output channels (labels including background); default: the checkpoint's, where a
    1-class (sigmoid) head becomes 2 softmax classes exactly, since sigmoid(z) = softmax([0, z])[1].
    in_channels 1 sums the RGB patch-embed filters. Deep-supervision heads have no counterpart and keep their
    initialisation. ``architecture``: further SAUMamba arguments (dims, depths, ...; default: the paper's).
    """
    from nnunetv2_sa_umamba.architectures.sa_umamba import SAUMamba  # imported here: the network imports the ops

    state_dict = strip_wrapper_prefixes(state_dict)
    if "final_conv.weight" not in state_dict or "final_conv.bias" not in state_dict:
        raise CheckpointError("no final_conv.weight/bias: this is not a SA-UMamba / VM-UNet segmentation checkpoint")
    trained = state_dict["final_conv.weight"].shape[0]
    num_classes = num_classes or (2 if trained == 1 else trained)
    if trained == 1 and num_classes == 2:
        state_dict["final_conv.weight"] = torch.cat([torch.zeros_like(state_dict["final_conv.weight"]),
                                                     state_dict["final_conv.weight"]])
        state_dict["final_conv.bias"] = torch.cat([torch.zeros(1), state_dict["final_conv.bias"]])
    elif trained != num_classes:
        raise CheckpointError(f"the checkpoint predicts {trained} classes but {num_classes} were asked for; pass "
                              f"--num-classes {2 if trained == 1 else trained} (a dataset with the same labels)")
    model = SAUMamba(in_channels, num_classes, **{**reference_architecture(state_dict), **architecture})
    report = load_reference_weights(model, state_dict)
    return {"network_weights": model.state_dict()}, report


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m nnunetv2_sa_umamba.checkpoints``: released checkpoint -> nnU-Net ``-pretrained_weights`` file."""
    parser = argparse.ArgumentParser(
        prog="saumamba_convert_checkpoint",
        description="Turn a checkpoint of the released SA-UMamba / VM-UNet training scripts (best.pth, latest.pth) "
                    "into a file for nnUNetv2_train ... -pretrained_weights FILE (with -tr nnUNetTrainerSAUMamba, "
                    "or nnUNetTrainerVMUNet for a VM-UNet checkpoint).")
    parser.add_argument("checkpoint", metavar="RELEASED_CHECKPOINT", help="best.pth or latest.pth of the released code")
    parser.add_argument("output", metavar="OUTPUT_PTH", help="the file to write")
    parser.add_argument("--in-channels", type=int, default=3, metavar="N",
                        help="input channels of the nnU-Net dataset (1 for Synapse CT; default 3)")
    parser.add_argument("--num-classes", type=int, default=None, metavar="N",
                        help="nnU-Net's output channels, i.e. labels including background (default: the checkpoint's; "
                             "a 1-class sigmoid checkpoint gives 2)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT_PTH")
    args = parser.parse_args(argv)
    try:
        if os.path.exists(args.output) and not args.overwrite:
            raise CheckpointError(f"{args.output} already exists; pass --overwrite to replace it")
        if os.path.exists(args.output) and os.path.samefile(args.output, args.checkpoint):
            raise CheckpointError(f"{args.output} is the input checkpoint; write to another file")
        if args.in_channels not in (1, 3):
            raise CheckpointError(f"--in-channels {args.in_channels}: the released networks take 3 channels (RGB) "
                                  f"or 1 (grey, repeated to RGB)")
        state_dict = load_state_dict_file(args.checkpoint)
        weights, report = reference_to_nnunet(state_dict, args.in_channels, args.num_classes)
        vm_unet = not any(reference_architecture(state_dict)[switch] for switch in ("rfac", "residual_scale"))
        torch.save(weights, args.output)
    except CheckpointError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"{parser.prog}: error: cannot write {args.output} ({error.strerror or error})", file=sys.stderr)
        return 1
    trainer = "nnUNetTrainerVMUNet" if vm_unet else "nnUNetTrainerSAUMamba"
    print(f"{report.summary()}\nWrote {args.output}; use it as nnUNetv2_train DATASET 2d FOLD -tr {trainer} "
          f"-pretrained_weights {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
