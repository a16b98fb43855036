"""Checkpoint interchange with the reference implementation (VM-UNet-style key names) and VMamba v0
ImageNet initialisation.

Key remapping is done by pure functions on state dicts (testable without files); file loading is safe:
``torch.load(..., weights_only=True)``, and the only non-tensor object that the known formats pickle (the
yacs config that VMamba's training script stores next to the weights) is read as a plain OrderedDict, so
no third-party code runs while unpickling.
"""
from __future__ import annotations

import collections
import os
import pickle
import re
from dataclasses import dataclass, field
from typing import Callable, Mapping

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
        raise KeyError(f"{len(unknown)} keys {unknown_message}, e.g. {unknown[:5]}")
    return out


def reference_to_ours(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Reference (official SA-UMamba / VM-UNet) key names -> ours. Unused reference modules are dropped;
    a key that matches no rule raises ``KeyError`` so that a foreign checkpoint is never half-read."""
    return _rename_state_dict(state_dict, "to_ours", _REFERENCE_UNUSED,
                              "are not in the SA-UMamba/VM-UNet reference naming")


def ours_to_reference(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our key names -> the reference naming. Deep-supervision heads have no reference counterpart and are
    left out."""
    return _rename_state_dict(state_dict, "to_reference", _OURS_ONLY, "have no reference name")


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read safely, or that does not fit the model."""


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint without running pickled code. Accepts a bare state dict or one wrapped under
    'model', 'state_dict' or 'network_weights' (nnU-Net)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals([(collections.OrderedDict, "yacs.config.CfgNode")]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        raise CheckpointError(
            f"{path} cannot be loaded safely (weights only): {str(error).splitlines()[0]}\n"
            "It is not a plain PyTorch state dict of a known format, or it pickles arbitrary objects. "
            "Re-save only its tensors (torch.save(model.state_dict(), ...)) from a trusted environment."
        ) from None
    for wrapper in ("model", "state_dict", "network_weights"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(wrapper), dict):
            checkpoint = checkpoint[wrapper]
            break
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise CheckpointError(f"{path} does not hold a state dict (name -> tensor)")
    return dict(checkpoint)


@dataclass
class LoadReport:
    """What a checkpoint load did: model keys filled, checkpoint keys skipped with the reason, and model keys
    left at their initialisation."""
    loaded: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"loaded {len(self.loaded)} tensors, skipped {len(self.skipped)} checkpoint tensors, "
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
    """Load a state dict in the reference naming (official SA-UMamba / VM-UNet checkpoint) into ``model``.
    With ``strict``, any shape mismatch or model tensor left unfilled (deep-supervision heads excepted)
    raises ``CheckpointError``."""
    model_state = model.state_dict()
    report = LoadReport()
    renamed = reference_to_ours(state_dict)
    sources = {_rename(k, "to_ours"): k for k in state_dict if not _REFERENCE_UNUSED.match(k)}
    _fill(model_state, {k: (sources[k], v) for k, v in renamed.items()}, report)
    report.missing = [k for k in model_state if k not in report.loaded]
    not_filled = [k for k in report.missing if not k.startswith("deep_supervision_heads.")]
    if strict and (report.skipped or not_filled):
        raise CheckpointError(
            "checkpoint does not fit the model: "
            + "; ".join([f"{k}: {why}" for k, why in list(report.skipped.items())[:5]] + not_filled[:5])
            + ". Build the model with the checkpoint's configuration (classes, input channels, ablation switches).")
    model.load_state_dict(model_state)
    return report


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
