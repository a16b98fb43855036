"""Reference-naming import/export and the VMamba ImageNet loader, on synthetic checkpoints."""
import pytest
import torch

from nnunetv2_sa_umamba.architectures.sa_umamba import SAUMamba
from nnunetv2_sa_umamba.checkpoints import (CheckpointError, load_reference_weights, load_state_dict_file,
                                            load_vmamba_pretrained, ours_to_reference, reference_to_ours)

SMALL = dict(dims=(16, 32, 64, 128), depths=(2, 2, 2, 2), decoder_depths=(2, 2, 2, 1))


def test_export_uses_the_reference_names():
    reference = ours_to_reference(SAUMamba(3, 9, **SMALL).state_dict())
    for key in ["patch_embed.proj.weight", "patch_embed.norm.bias",
                "layers.0.blocks.1.skip_scale", "layers.0.blocks.1.skip_scale2", "layers.3.blocks.0.ln_2.weight",
                "layers.1.blocks.0.self_attention.x_proj_weight", "layers.2.blocks.1.self_attention.A_logs",
                "layers.0.blocks.0.conv_blk.cab.0.get_weight.1.weight",
                "layers.0.blocks.0.conv_blk.cab.0.generate_feature.0.weight",
                "layers.0.blocks.0.conv_blk.cab.0.generate_feature.1.running_var",
                "layers.0.blocks.0.conv_blk.cab.0.conv.0.bias", "layers.0.blocks.0.conv_blk.cab.0.conv.1.weight",
                "layers.2.downsample.reduction.weight", "layers_up.0.blocks.1.self_attention.out_proj.weight",
                "layers_up.3.upsample.expand.weight", "layers_up.1.upsample.norm.weight",
                "final_up.expand.weight", "final_up.norm.weight", "final_conv.weight", "final_conv.bias"]:
        assert key in reference, key
    assert not any(k.startswith("deep_supervision_heads") for k in reference)
    assert "layers.3.downsample.reduction.weight" not in reference
    assert "layers_up.0.upsample.expand.weight" not in reference


def test_round_trip_through_reference_naming_is_exact():
    model = SAUMamba(3, 2, **SMALL)
    ours = {k: v for k, v in model.state_dict().items() if not k.startswith("deep_supervision_heads")}
    back = reference_to_ours(ours_to_reference(ours))
    assert back.keys() == ours.keys()
    assert all(back[k] is ours[k] for k in ours)


def test_reference_import_ignores_unused_modules_and_loads_values():
    source, target = SAUMamba(3, 2, **SMALL), SAUMamba(3, 2, **SMALL)
    reference = ours_to_reference(source.state_dict())
    reference["iaffs.0.local_att.0.weight"] = torch.zeros(3)
    reference["layers_up.2.new_upsample.offset.weight"] = torch.zeros(3)
    report = load_reference_weights(target, reference)
    assert not report.skipped
    assert all(k.startswith("deep_supervision_heads") for k in report.missing)
    for key, value in source.state_dict().items():
        if not key.startswith("deep_supervision_heads"):
            assert torch.equal(target.state_dict()[key], value), key


def test_reference_import_refuses_unknown_keys_and_wrong_shapes():
    with pytest.raises(KeyError, match="not in the SA-UMamba/VM-UNet reference naming"):
        reference_to_ours({"encoder.stem.weight": torch.zeros(1)})
    reference = ours_to_reference(SAUMamba(3, 9, **SMALL).state_dict())
    with pytest.raises(CheckpointError, match="final_conv|head"):
        load_reference_weights(SAUMamba(3, 2, **SMALL), reference)


def _vmamba_small_like_checkpoint(dims=(16, 32, 64, 128), in_channels=3) -> dict:
    """Encoder keys of a VMamba v0 classifier (depths 2, 2, 27, 2) in the real layout, plus its head."""
    encoder = SAUMamba(in_channels, 1, dims=dims, depths=(2, 2, 27, 2), decoder_depths=(1, 1, 1, 1),
                       rfac=False, residual_scale=False)
    state = {k: v for k, v in ours_to_reference(encoder.state_dict()).items() if not k.startswith(("layers_up", "final"))}
    state["classifier.norm.weight"] = torch.ones(dims[-1])
    state["classifier.head.weight"] = torch.zeros(1000, dims[-1])
    return state


def test_vmamba_loader_fills_encoder_and_decoder(tmp_path):
    from yacs.config import CfgNode
    checkpoint = _vmamba_small_like_checkpoint()
    path = tmp_path / "vmamba_small_e238_ema.pth"
    torch.save({"model": checkpoint, "config": CfgNode({"MODEL": CfgNode({"TYPE": "vssm"})}), "epoch": 238}, path)

    model = SAUMamba(3, 2, **SMALL)
    report = load_vmamba_pretrained(model, path)
    state = model.state_dict()
    assert torch.equal(state["patch_embed.proj.weight"], checkpoint["patch_embed.proj.weight"])
    assert torch.equal(state["encoder_stages.2.blocks.1.ss2d.A_logs"], checkpoint["layers.2.blocks.1.self_attention.A_logs"])
    # layers.0 -> decoder stage 3, layers.3 -> decoder stage 0
    assert torch.equal(state["decoder_stages.3.blocks.0.ss2d.in_proj.weight"],
                       checkpoint["layers.0.blocks.0.self_attention.in_proj.weight"])
    assert torch.equal(state["decoder_stages.0.blocks.1.norm1.weight"], checkpoint["layers.3.blocks.1.ln_1.weight"])
    assert "layers.2.blocks.26.ln_1.weight" in report.skipped
    assert "classifier.head.weight" in report.skipped
    # RFAC branches, scales and expands are not in a classifier checkpoint
    assert "encoder_stages.0.blocks.0.rfac.out_conv.weight" in report.missing
    assert "decoder_stages.1.upsample.expand.weight" in report.missing


def test_vmamba_loader_sums_rgb_filters_for_one_channel_input(tmp_path):
    checkpoint = _vmamba_small_like_checkpoint()
    path = tmp_path / "vmamba.pth"
    torch.save({"model": checkpoint}, path)
    model = SAUMamba(1, 2, **SMALL)
    load_vmamba_pretrained(model, path)
    expected = checkpoint["patch_embed.proj.weight"].sum(dim=1, keepdim=True)
    assert torch.equal(model.state_dict()["patch_embed.proj.weight"], expected)
    # a 1-channel image through summed filters equals the image repeated to RGB through the originals
    image = torch.randn(1, 1, 8, 8)
    torch.testing.assert_close(torch.nn.functional.conv2d(image, expected, stride=4),
                               torch.nn.functional.conv2d(image.repeat(1, 3, 1, 1), checkpoint["patch_embed.proj.weight"], stride=4))


def test_vmamba_loader_reports_shape_mismatches(tmp_path):
    path = tmp_path / "vmamba_tiny_dims.pth"
    torch.save({"model": _vmamba_small_like_checkpoint(dims=(8, 16, 32, 64))}, path)
    with pytest.raises(CheckpointError, match="no tensor matches"):
        load_vmamba_pretrained(SAUMamba(3, 2, **SMALL), path)


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickled_objects_are_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "extra": _Payload()}, path)
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        load_state_dict_file(path)
    assert "this must never run" not in capsys.readouterr().out


def test_missing_and_non_state_dict_files_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_state_dict_file(tmp_path / "nope.pth")
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match="does not hold a state dict"):
        load_state_dict_file(path)


def test_yacs_config_is_read_as_plain_data(tmp_path):
    from yacs.config import CfgNode
    path = tmp_path / "with_config.pth"
    torch.save({"model": {"w": torch.ones(2)}, "config": CfgNode({"A": 1})}, path)
    state = load_state_dict_file(path)
    assert list(state) == ["w"]
    assert torch.equal(state["w"], torch.ones(2))
