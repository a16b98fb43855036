"""Trainer pieces: network from plans, patch rounding, deep supervision, optimiser/scheduler, variants,
discovery through nnU-Net's own lookup."""
import copy
import json
from pathlib import Path

import pytest
import torch

from nnunetv2_sa_umamba.architectures.sa_umamba import SAUMamba
from nnunetv2_sa_umamba.modules.rfaconv import RFAConv
from nnunetv2_sa_umamba.training.nnUNetTrainerSAUMamba import nnUNetTrainerSAUMamba
from nnunetv2_sa_umamba.training.variants.initialization import nnUNetTrainerSAUMambaImageNet
from nnunetv2_sa_umamba.training.variants.network_architecture import (
    nnUNetTrainerSAUMambaNoCudaGraphs,
    nnUNetTrainerSAUMambaNoDeepSupervision,
    nnUNetTrainerSAUMambaReference,
    nnUNetTrainerSAUMambaRSSSDecoder,
    nnUNetTrainerVMUNet,
)

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def nnunet_folders(tmp_path, monkeypatch):
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / name).mkdir()
        monkeypatch.setenv(name, str(tmp_path / name))
    return tmp_path


def make_trainer(cls, patch_size=(40, 40), configuration="2d"):
    plans = json.loads((FIXTURES / "nnUNetPlans_2d.json").read_text())
    plans["configurations"][configuration]["patch_size"] = list(patch_size)
    plans["continue_training"] = False
    dataset_json = json.loads((FIXTURES / "dataset_rgb.json").read_text())
    return cls(plans, configuration, 0, dataset_json, device=torch.device("cpu"))


@pytest.mark.parametrize("planned, rounded", [((40, 40), [64, 64]), ((112, 112), [128, 128]),
                                              ((20, 128), [32, 128]), ((64, 96), [64, 96])])
def test_patch_size_is_rounded_up_in_the_saved_plans(nnunet_folders, planned, rounded):
    trainer = make_trainer(nnUNetTrainerSAUMamba, planned)
    assert trainer.configuration_manager.patch_size == rounded
    # the plans that on_train_start saves next to the checkpoint, which --val and nnUNetv2_predict read
    assert trainer.plans_manager.plans["configurations"]["2d"]["patch_size"] == rounded
    assert trainer.plans_manager.get_configuration("2d").patch_size == rounded


def test_3d_configuration_is_refused(nnunet_folders):
    plans = json.loads((FIXTURES / "nnUNetPlans_2d.json").read_text())
    plans["configurations"]["3d_fullres"] = copy.deepcopy(plans["configurations"]["2d"])
    plans["configurations"]["3d_fullres"]["patch_size"] = [32, 40, 40]
    plans["continue_training"] = False
    dataset_json = json.loads((FIXTURES / "dataset_rgb.json").read_text())
    with pytest.raises(RuntimeError, match="2D network"):
        nnUNetTrainerSAUMamba(plans, "3d_fullres", 0, dataset_json, device=torch.device("cpu"))


def build_from_trainer(trainer, deep_supervision=True):
    return type(trainer).build_network_architecture(
        trainer.plans_manager, trainer.configuration_manager, 3, trainer.label_manager.num_segmentation_heads,
        deep_supervision)


def test_network_from_plans_matches_deep_supervision_targets(nnunet_folders):
    from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
    trainer = make_trainer(nnUNetTrainerSAUMamba, (40, 72))
    network = build_from_trainer(trainer).eval()
    assert isinstance(network, SAUMamba) and network.in_channels == 3 and network.num_classes == 2
    patch = trainer.configuration_manager.patch_size
    with torch.no_grad():
        outputs = network(torch.randn(1, 3, *patch))
    scales = trainer._get_deep_supervision_scales()
    targets = DownsampleSegForDSTransform(ds_scales=scales).apply(
        {"segmentation": torch.zeros(1, *patch)})["segmentation"]
    assert len(outputs) == len(scales) == len(targets)
    assert [tuple(o.shape[2:]) for o in outputs] == [tuple(t.shape[1:]) for t in targets]


def test_predictor_style_build_loads_training_weights_strictly(nnunet_folders):
    trainer = make_trainer(nnUNetTrainerSAUMamba)
    trained = build_from_trainer(trainer, deep_supervision=True)
    for_inference = nnUNetTrainerSAUMamba.build_network_architecture(
        trainer.plans_manager, trainer.configuration_manager, 3, 2, enable_deep_supervision=False)
    for_inference.load_state_dict(trained.state_dict(), strict=True)
    assert isinstance(for_inference(torch.randn(1, 3, 64, 64)), torch.Tensor)


def test_deep_supervision_heads_are_frozen_without_deep_supervision(nnunet_folders):
    trainer = make_trainer(nnUNetTrainerSAUMambaNoDeepSupervision)
    assert trainer.enable_deep_supervision is False and trainer._get_deep_supervision_scales() is None
    network = build_from_trainer(trainer, deep_supervision=False)
    assert not any(p.requires_grad for p in network.deep_supervision_heads.parameters())
    assert all(p.requires_grad for n, p in network.named_parameters() if not n.startswith("deep_supervision"))


def test_set_deep_supervision_toggles_the_network(nnunet_folders):
    trainer = make_trainer(nnUNetTrainerSAUMamba)
    trainer.network = build_from_trainer(trainer)
    trainer.set_deep_supervision_enabled(False)
    assert trainer.network.deep_supervision is False
    trainer.set_deep_supervision_enabled(True)
    assert trainer.network.deep_supervision is True


def lrs_over_run(trainer):
    trainer.network = torch.nn.Linear(2, 2)
    optimizer, scheduler = trainer.configure_optimizers()
    lrs = {}
    for epoch in (0, trainer.num_epochs // 2, trainer.num_epochs):
        scheduler.step(epoch)
        lrs[epoch] = optimizer.param_groups[0]["lr"]
    return optimizer, list(lrs.values())


@pytest.mark.parametrize("cls, fused_on_cuda", [(nnUNetTrainerSAUMamba, True),
                                                  (nnUNetTrainerSAUMambaReference, False)])
def test_adamw_is_fused_on_cuda_for_the_fast_path_only(nnunet_folders, cls, fused_on_cuda):
    trainer = make_trainer(cls)
    assert cls.fused_optimizer is fused_on_cuda
    optimizer, _ = lrs_over_run(trainer)
    assert not optimizer.defaults["fused"]  # never on the CPU
    trainer.device = torch.device("cuda")  # only the flag is read; torch's fused AdamW also accepts CPU tensors
    optimizer, _ = trainer.configure_optimizers()
    assert bool(optimizer.defaults["fused"]) is fused_on_cuda
    # unfused means torch's default choice (multi-tensor foreach on CUDA), never its per-parameter loop
    assert optimizer.defaults["fused"] in (True, None) and optimizer.defaults["foreach"] is None


def test_architecture_variants(nnunet_folders):
    vm_unet = build_from_trainer(make_trainer(nnUNetTrainerVMUNet))
    assert not any(isinstance(m, RFAConv) for m in vm_unet.modules())
    assert sum(p.numel() for n, p in vm_unet.named_parameters() if not n.startswith("deep")) == 27_427_561 - 25 + 50
    rsss_decoder = build_from_trainer(make_trainer(nnUNetTrainerSAUMambaRSSSDecoder))
    assert sum(isinstance(m, RFAConv) for m in rsss_decoder.modules()) == 15
    assert build_from_trainer(make_trainer(nnUNetTrainerSAUMambaReference)).kernels.implementation == "reference"
    assert build_from_trainer(make_trainer(nnUNetTrainerSAUMamba)).kernels.implementation == "fast"


def test_imagenet_variant_needs_its_checkpoint_only_to_start_a_training(nnunet_folders, monkeypatch):
    monkeypatch.delenv("SAUMAMBA_VMAMBA_CHECKPOINT", raising=False)
    started = []
    monkeypatch.setattr(nnUNetTrainerSAUMamba, "on_train_start", lambda self: started.append(self.current_epoch))
    trainer = make_trainer(nnUNetTrainerSAUMambaImageNet)  # --val and nnUNetv2_predict build it without one
    with pytest.raises(RuntimeError, match="SAUMAMBA_VMAMBA_CHECKPOINT"):
        trainer.on_train_start()
    monkeypatch.setenv("SAUMAMBA_VMAMBA_CHECKPOINT", str(nnunet_folders / "missing.pth"))
    with pytest.raises(RuntimeError, match="not a readable file"):
        trainer.on_train_start()
    assert started == []  # refused before nnU-Net's own start-up
    trainer.current_epoch = 5  # resumed with --c: the run's own weights, no ImageNet checkpoint needed
    trainer.on_train_start()
    assert started == [5]


@pytest.mark.parametrize("keep_autotuning", [False, True])
def test_training_runs_without_cudnn_autotuning_unless_asked(nnunet_folders, monkeypatch, keep_autotuning):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    seen = []
    monkeypatch.setattr(nnUNetTrainer, "on_train_start", lambda self: seen.append(torch.backends.cudnn.benchmark))
    monkeypatch.setattr(nnUNetTrainer, "on_train_end", lambda self: seen.append(torch.backends.cudnn.benchmark))
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)  # as nnUNetv2_train sets it before training
    trainer = make_trainer(nnUNetTrainerSAUMamba)
    trainer.cudnn_autotune = keep_autotuning
    trainer.network = torch.nn.Linear(2, 2)
    trainer.on_train_start()
    during = torch.backends.cudnn.benchmark
    trainer.on_train_end()
    # changed before nnU-Net's start-up; nnU-Net's own setting back at the end, before the final validation
    assert seen == [keep_autotuning, True] and during is keep_autotuning
    assert torch.backends.cudnn.benchmark is True
    assert ("autotuning is off while training" in Path(trainer.log_file).read_text()) is not keep_autotuning


def test_bad_kernel_environment_fails_when_the_trainer_is_built(nnunet_folders, monkeypatch):
    monkeypatch.setenv("SAUMAMBA_FUSED_KERNELS", "fastest")
    with pytest.raises(ValueError, match="SAUMAMBA_FUSED_KERNELS='fastest' is not one of auto, triton, torch"):
        make_trainer(nnUNetTrainerSAUMamba)


def test_trainer_log_names_network_and_kernels(nnunet_folders, monkeypatch):
    trainer = make_trainer(nnUNetTrainerVMUNet)
    trainer.network = build_from_trainer(trainer)
    trainer.batch_size = 2
    summary = trainer._network_summary()
    assert summary.startswith("Network: VM-UNet (SAUMamba, VSS decoder, RFAC off, residual scales off), "
                              "27,427,586 parameters")  # 2 classes: +25 in the head
    assert "patch [64, 64], batch 2" in summary and "scan backend torch (auto)" in summary
    assert "CUDA graphs off" in summary


@pytest.mark.parametrize("cls, device, compiled, graphs", [
    (nnUNetTrainerSAUMamba, "cuda", False, True), (nnUNetTrainerSAUMamba, "cpu", False, False),
    (nnUNetTrainerSAUMamba, "cuda", True, False), (nnUNetTrainerSAUMambaNoCudaGraphs, "cuda", False, False),
    (nnUNetTrainerSAUMambaReference, "cuda", False, False)])
def test_cuda_graphs_on_one_gpu_for_the_fast_path_only(nnunet_folders, cls, device, compiled, graphs):
    trainer = make_trainer(cls)
    trainer.device = torch.device(device)  # only the type is read
    network = build_from_trainer(trainer)
    trainer.network = torch.compile(network) if compiled else network
    assert trainer._use_cuda_graphs() is graphs


@pytest.mark.parametrize("cls, compile_env, graphs", [
    (nnUNetTrainerSAUMamba, "", True), (nnUNetTrainerSAUMamba, "1", False),
    (nnUNetTrainerSAUMambaNoCudaGraphs, "", False), (nnUNetTrainerSAUMambaReference, "", False)])
def test_predictor_builds_with_inference_graphs_unless_compiled_or_turned_off(nnunet_folders, monkeypatch, cls,
                                                                              compile_env, graphs):
    """nnUNetv2_predict builds the network through the trainer class: its tiles replay as a CUDA graph, except where
    the predictor compiles the network (nnUNet_compile) or the trainer turns graphs off."""
    from nnunetv2_sa_umamba.training.cuda_graphs import graphs_enabled
    monkeypatch.setenv("nnUNet_compile", compile_env)
    trainer = make_trainer(cls)
    network = cls.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 3, 2,
                                             enable_deep_supervision=False)
    assert graphs_enabled(network, "inference") is graphs and not graphs_enabled(network, "training")


@pytest.mark.parametrize("fails", [False, True], ids=["completes", "raises"])
def test_final_validation_runs_with_inference_graphs_and_drops_them_after(nnunet_folders, monkeypatch, fails):
    """The final validation predicts like nnUNetv2_predict (inference graphs on), and afterwards, even after an
    error, no graph stays reserved."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunetv2_sa_umamba.training.cuda_graphs import disable_inference_graphs, graphs_enabled
    trainer = make_trainer(nnUNetTrainerSAUMamba)
    trainer.network = build_from_trainer(trainer)
    disable_inference_graphs(trainer.network)  # as initialize() leaves it for training
    monkeypatch.setattr(type(trainer), "_use_cuda_graphs", lambda self: True)
    seen = []

    def validation(self, save_probabilities=False):
        seen.append(graphs_enabled(self.network, "inference"))
        if fails:
            raise RuntimeError("export failed")
    monkeypatch.setattr(nnUNetTrainer, "perform_actual_validation", validation)
    if fails:
        with pytest.raises(RuntimeError, match="export failed"):
            trainer.perform_actual_validation()
    else:
        trainer.perform_actual_validation()
    assert seen == [True] and not graphs_enabled(trainer.network, "inference")
    assert "forward" not in trainer.network.__dict__


def test_compile_is_off_by_default(nnunet_folders, monkeypatch):
    monkeypatch.delenv("nnUNet_compile", raising=False)
    assert make_trainer(nnUNetTrainerSAUMamba)._do_i_compile() is False


def test_nnunet_finds_every_trainer_through_ext_trainer(monkeypatch):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from nnunetv2_sa_umamba.ext_trainers import trainer_dir
    monkeypatch.setenv("nnUNet_extTrainer", trainer_dir())
    for name in ("nnUNetTrainerSAUMamba", "nnUNetTrainerVMUNet", "nnUNetTrainerSAUMambaScaleOnly",
                 "nnUNetTrainerSAUMambaRFACOnly", "nnUNetTrainerSAUMamba_300epochs", "nnUNetTrainerSAUMambaSGD",
                 "nnUNetTrainerSAUMambaImageNet", "nnUNetTrainerSAUMambaNoDeepSupervision",
                 "nnUNetTrainerSAUMambaRSSSDecoder", "nnUNetTrainerSAUMambaReference",
                 "nnUNetTrainerSAUMambaNoCudaGraphs", "nnUNetTrainerSAUMambaPaperLR"):
        found = recursive_find_trainer_class_by_name(name)
        assert found.__name__ == name and issubclass(found, nnUNetTrainerSAUMamba)


@pytest.mark.cuda
def test_nnunet_predictor_with_inference_graphs_matches_kernel_by_kernel(nnunet_folders):
    """nnU-Net's own sliding-window prediction (inference mode, fp16 autocast, Gaussian weighting, mirroring: four
    calls per tile) on the network built for nnUNetv2_predict, with and without inference graphs."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunetv2_sa_umamba.training.cuda_graphs import graphs_recorded
    trainer = make_trainer(nnUNetTrainerSAUMamba, (64, 64))
    image = torch.randn(3, 1, 150, 200, generator=torch.Generator().manual_seed(0))
    logits, networks, weights = [], [], None
    for cls in (nnUNetTrainerSAUMamba, nnUNetTrainerSAUMambaNoCudaGraphs):
        network = cls.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 3, 2,
                                                 enable_deep_supervision=False)
        weights = weights or network.state_dict()
        network.load_state_dict(weights)
        predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                    perform_everything_on_device=True, device=torch.device("cuda"), verbose=False,
                                    allow_tqdm=False)
        predictor.manual_initialization(network, trainer.plans_manager, trainer.configuration_manager, None,
                                        trainer.dataset_json, cls.__name__, (0, 1))
        logits.append(predictor.predict_sliding_window_return_logits(image).float().cpu())
        networks.append(network)
    assert graphs_recorded(networks[0], "inference") == 1 and not graphs_recorded(networks[1], "inference")
    assert logits[0].shape == (2, 1, 150, 200)
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-2, atol=1e-2)


def test_variants_set_nnunets_run_length_and_a_misspelled_name_is_refused(nnunet_folders):
    from nnunetv2_sa_umamba.training.variants.demo import nnUNetTrainerSAUMambaDemo
    from nnunetv2_sa_umamba.training.variants.training_length import nnUNetTrainerSAUMamba_300epochs

    demo = make_trainer(nnUNetTrainerSAUMambaDemo)
    assert (demo.num_epochs, demo.num_iterations_per_epoch, demo.num_val_iterations_per_epoch,
            demo.save_every) == (14, 12, 2, 4)
    paper = make_trainer(nnUNetTrainerSAUMamba_300epochs)
    default = make_trainer(nnUNetTrainerSAUMamba)
    assert (paper.num_epochs, default.num_epochs) == (300, 1000)
    assert paper.num_iterations_per_epoch == default.num_iterations_per_epoch == 250

    class Misspelled(nnUNetTrainerSAUMamba):
        run_length = {"num_epoch": 3}

    with pytest.raises(AttributeError, match="num_epoch"):
        make_trainer(Misspelled)


@pytest.mark.parametrize("cls, on_cuda, expected", [(nnUNetTrainerSAUMamba, True, 1),
                                                     (nnUNetTrainerSAUMamba, False, 0),
                                                     (nnUNetTrainerSAUMambaReference, True, 0)])
def test_triton_kernels_are_compiled_ahead_once_before_the_first_step_on_cuda(nnunet_folders, monkeypatch, cls,
                                                                              on_cuda, expected):
    from nnunetv2_sa_umamba.ops.compile_stats import Compilation, CompileRecord
    from nnunetv2_sa_umamba.training import nnUNetTrainerSAUMamba as trainer_module

    calls = []

    def fake_precompile(network, x, autocast_dtype):
        calls.append((network, x, autocast_dtype))
        return CompileRecord(observable=True, compilations=[Compilation("_kernel", "v", 0.5, False)])

    monkeypatch.setattr(trainer_module, "precompile_training_step", fake_precompile)
    trainer = make_trainer(cls)
    trainer.network = build_from_trainer(trainer)
    logged = []
    monkeypatch.setattr(trainer, "print_to_log_file", lambda *args, **kwargs: logged.append(" ".join(map(str, args))))
    if on_cuda:
        trainer.device = torch.device("cuda")  # only read by the decision; the dry step itself is faked
    data = torch.zeros(2, 3, 64, 64)
    trainer._precompile_kernels(data)
    trainer._precompile_kernels(data)  # the second step compiles nothing ahead
    assert len(calls) == expected
    if expected:
        network, x, dtype = calls[0]
        assert network is trainer._plain_network() and x is data and dtype == torch.get_autocast_dtype("cuda")
        assert any("Compiled 1 Triton kernel variants ahead" in line for line in logged)
