"""Reference-naming import/export, the released scripts' files, nnU-Net's checkpoints and the VMamba ImageNet
loader, on synthetic checkpoints laid out as those programs write them."""
import numpy as np
import pytest
import torch

from nnunetv2_sa_umamba.architectures.sa_umamba import SAUMamba
from nnunetv2_sa_umamba.checkpoints import (
    CheckpointError,
    load_reference_checkpoint,
    load_reference_weights,
    load_state_dict_file,
    load_vmamba_pretrained,
    main,
    ours_to_reference,
    reference_to_nnunet,
    reference_to_ours,
)

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
    with pytest.raises(CheckpointError, match="not in the SA-UMamba/VM-UNet reference naming"):
        reference_to_ours({"encoder.stem.weight": torch.zeros(1)})
    reference = ours_to_reference(SAUMamba(3, 9, **SMALL).state_dict())
    with pytest.raises(CheckpointError, match="final_conv|head"):
        load_reference_weights(SAUMamba(3, 2, **SMALL), reference)


def _vmamba_small_like_checkpoint(dims=(16, 32, 64, 128), in_channels=3) -> dict:
    """Encoder keys of a VMamba v0 classifier (depths 2, 2, 27, 2) in the real layout, plus its head."""
    encoder = SAUMamba(in_channels, 1, dims=dims, depths=(2, 2, 27, 2), decoder_depths=(1, 1, 1, 1),
                       rfac=False, residual_scale=False)
    state = {k: v for k, v in ours_to_reference(encoder.state_dict()).items()
             if not k.startswith(("layers_up", "final"))}
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
    assert torch.equal(state["encoder_stages.2.blocks.1.ss2d.A_logs"],
                       checkpoint["layers.2.blocks.1.self_attention.A_logs"])
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
                               torch.nn.functional.conv2d(image.repeat(1, 3, 1, 1),
                                                          checkpoint["patch_embed.proj.weight"], stride=4))


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


# --- files of the released training scripts -------------------------------------------------------------------

def _released_state_dict(model: SAUMamba) -> dict:
    """``VMUNet.state_dict()`` as the released train.py / train_synapse.py save it: the network is VMUNet's
    ``vmunet`` attribute, and the released code also builds iAFF and DySample modules that never run."""
    reference = ours_to_reference(model.state_dict())
    reference["iaffs.0.local_att.0.weight"] = torch.zeros(4, 8, 1, 1)
    reference["layers_up.1.new_upsample.offset.weight"] = torch.zeros(8, 4, 1, 1)
    return {f"vmunet.{key}": value for key, value in reference.items()}


def _assert_same_weights(target: SAUMamba, source: SAUMamba) -> None:
    for key, value in source.state_dict().items():
        if not key.startswith("deep_supervision_heads"):
            assert torch.equal(target.state_dict()[key], value), key


def test_best_pth_of_the_released_scripts_loads(tmp_path):
    source, target = SAUMamba(3, 2, **SMALL), SAUMamba(3, 2, **SMALL)
    torch.save(_released_state_dict(source), tmp_path / "best.pth")
    report = load_reference_weights(target, load_state_dict_file(tmp_path / "best.pth"))
    _assert_same_weights(target, source)
    assert sorted(report.ignored) == ["iaffs.0.local_att.0.weight", "layers_up.1.new_upsample.offset.weight"]
    assert not report.skipped and "ignored 2" in report.summary()
    assert load_reference_checkpoint(SAUMamba(3, 2, **SMALL), tmp_path / "best.pth").ignored == report.ignored


def test_latest_pth_of_the_released_scripts_loads(tmp_path):
    source, target = SAUMamba(3, 9, **SMALL), SAUMamba(3, 9, **SMALL)
    optimizer = torch.optim.AdamW(source.parameters(), lr=1e-3)
    source(torch.randn(2, 3, 64, 64)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=50, eta_min=1e-5)
    # train_synapse.py's dict; its losses are numpy means
    torch.save({"epoch": 3, "min_loss": np.float64(0.41), "min_epoch": 2, "loss": np.float64(0.43),
                "model_state_dict": _released_state_dict(source), "optimizer_state_dict": optimizer.state_dict(),
                "scheduler_state_dict": scheduler.state_dict()}, tmp_path / "latest.pth")
    report = load_reference_checkpoint(target, tmp_path / "latest.pth")
    _assert_same_weights(target, source)
    assert len(report.ignored) == 2


def test_one_channel_model_gets_the_summed_rgb_filters(tmp_path):
    source, target = SAUMamba(3, 9, **SMALL), SAUMamba(1, 9, **SMALL)
    load_reference_weights(target, _released_state_dict(source))
    rgb = source.state_dict()["patch_embed.proj.weight"]
    assert torch.equal(target.state_dict()["patch_embed.proj.weight"], rgb.sum(dim=1, keepdim=True))
    # the released code repeats a grey image to 3 channels: the same output, exactly up to rounding
    source.eval(), target.eval()
    grey = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(target(grey), source(grey.repeat(1, 3, 1, 1)), rtol=1e-4, atol=1e-4)


def test_released_binary_checkpoint_becomes_an_nnunet_pretrained_file(tmp_path):
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    source = SAUMamba(3, 1, **SMALL).eval()
    with torch.no_grad():
        source.head.bias.fill_(0.3)
    weights, report = reference_to_nnunet(_released_state_dict(source), **SMALL)
    torch.save(weights, tmp_path / "pretrained.pth")
    # what nnUNetv2_train -pretrained_weights does with it, into the network nnU-Net builds (2 softmax classes)
    network = SAUMamba(3, 2, **SMALL, deep_supervision=True)
    load_pretrained_weights(network, str(tmp_path / "pretrained.pth"))
    network.eval().deep_supervision = False
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        # sigmoid of the released 1-class head == softmax foreground of nnU-Net's 2-class head
        torch.testing.assert_close(torch.softmax(network(image), 1)[:, 1], torch.sigmoid(source(image))[:, 0],
                                   rtol=1e-5, atol=1e-6)
    assert len(report.ignored) == 2
    with pytest.raises(CheckpointError, match="predicts 1 classes but 3"):
        reference_to_nnunet(_released_state_dict(source), num_classes=3, **SMALL)


def test_vm_unet_checkpoint_converts_with_its_architecture(tmp_path):
    source = SAUMamba(3, 9, **SMALL, rfac=False, residual_scale=False)
    weights, _ = reference_to_nnunet(_released_state_dict(source), in_channels=1, **SMALL)
    network = SAUMamba(1, 9, **SMALL, rfac=False, residual_scale=False)
    network.load_state_dict(weights["network_weights"])
    assert torch.equal(network.state_dict()["patch_embed.proj.weight"],
                       source.state_dict()["patch_embed.proj.weight"].sum(1, keepdim=True))


def test_conversion_command_refuses_bad_input(tmp_path, capsys):
    torch.save({"w": torch.zeros(1)}, tmp_path / "foreign.pth")
    assert main([str(tmp_path / "foreign.pth"), str(tmp_path / "out.pth")]) == 1
    assert "error: no final_conv.weight" in capsys.readouterr().err
    (tmp_path / "out.pth").write_text("keep")
    assert main([str(tmp_path / "foreign.pth"), str(tmp_path / "out.pth")]) == 1
    assert "--overwrite" in capsys.readouterr().err and (tmp_path / "out.pth").read_text() == "keep"


# --- nnU-Net's own checkpoints and broken files --------------------------------------------------------------

def test_nnunet_checkpoint_with_numpy_logging_loads(tmp_path):
    model = SAUMamba(3, 2, **SMALL)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.99, nesterov=True)
    # nnUNetTrainer.save_checkpoint's dict; the logger holds numpy means (float32 losses, float64 Dice)
    logging = {"mean_fg_dice": [np.float64(0.5)], "ema_fg_dice": [np.float64(0.5)],
               "dice_per_class_or_region": [[np.float64(0.5)]], "train_losses": [np.float32(0.7)],
               "val_losses": [np.float32(0.6)], "lrs": [0.01], "epoch_start_timestamps": [1.0],
               "epoch_end_timestamps": [2.0]}
    torch.save({"network_weights": model.state_dict(), "optimizer_state": optimizer.state_dict(),
                "grad_scaler_state": None, "logging": logging, "_best_ema": np.float64(0.5), "current_epoch": 1,
                "init_args": {"plans": {}, "configuration": "2d", "fold": 0, "dataset_json": {},
                              "device": torch.device("cpu")},
                "trainer_name": "nnUNetTrainerSAUMamba", "inference_allowed_mirroring_axes": (0, 1)},
               tmp_path / "checkpoint_final.pth")
    state = load_state_dict_file(tmp_path / "checkpoint_final.pth")
    assert state.keys() == model.state_dict().keys()
    # exactly those numpy types: other scalars, arrays and object arrays stay refused
    for value in (np.float16(1.0), np.array([1.0]), np.array([None], dtype=object)):
        torch.save({"network_weights": {"w": torch.zeros(1)}, "logging": {"x": [value]}}, tmp_path / "c.pth")
        with pytest.raises(CheckpointError, match="cannot be loaded safely"):
            load_state_dict_file(tmp_path / "c.pth")


def test_refused_pickle_names_the_blocked_global_without_colour_codes(tmp_path):
    torch.save({"model": {"w": torch.zeros(1)}, "extra": _Payload()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError) as error:
        load_state_dict_file(tmp_path / "evil.pth")
    assert "Unsupported global" in str(error.value) and "print" in str(error.value)
    assert "\x1b" not in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("content", [b"", b"just some text\n", b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01"])
def test_broken_files_raise_checkpoint_error_naming_the_file(tmp_path, content):
    path = tmp_path / "broken.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="broken.pth"):
        load_state_dict_file(path)


def test_unknown_keys_in_a_file_name_the_file(tmp_path):
    torch.save({"encoder.stem.weight": torch.zeros(1)}, tmp_path / "other_net.pth")
    with pytest.raises(CheckpointError, match="other_net.pth.*not in the SA-UMamba/VM-UNet reference naming"):
        load_reference_checkpoint(SAUMamba(3, 2, **SMALL), tmp_path / "other_net.pth")
