"""nnU-Net's DDP with SA-UMamba: equal per-rank batches (nnU-Net's batch Dice all-gathers per-sample tensors)
and a two-process CPU run (gloo) of the network, nnU-Net's deep-supervision loss and DDP's gradient sync."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nnunetv2_sa_umamba.architectures.sa_umamba import SAUMamba

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("global_batch, world_size, per_rank", [(5, 2, 3), (4, 2, 2), (7, 4, 2), (12, 3, 4)])
def test_ddp_batch_is_equal_on_every_rank(tmp_path, monkeypatch, global_batch, world_size, per_rank):
    # imported here: the two-process test's children import this module, and the trainer's imports (nnU-Net's
    # trainer, torch._dynamo) would add seconds to each
    from nnunetv2_sa_umamba.training.nnUNetTrainerSAUMamba import nnUNetTrainerSAUMamba

    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(name, str(tmp_path))
    plans = json.loads((FIXTURES / "nnUNetPlans_2d.json").read_text())
    plans["configurations"]["2d"]["batch_size"] = global_batch
    plans["continue_training"] = False
    trainer = nnUNetTrainerSAUMamba(plans, "2d", 0, json.loads((FIXTURES / "dataset_rgb.json").read_text()),
                                    device=torch.device("cpu"))
    trainer.is_ddp = True
    monkeypatch.setattr(dist, "get_world_size", lambda: world_size)
    sizes = []
    for rank in range(world_size):
        monkeypatch.setattr(dist, "get_rank", lambda rank=rank: rank)
        trainer._set_batch_size_and_oversample()
        sizes.append(trainer.batch_size)
    assert sizes == [per_rank] * world_size


def _train_two_steps(rank: int, world_size: int, port: int, result_file: str) -> None:
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.manual_seed(0)
    network = torch.nn.parallel.DistributedDataParallel(
        SAUMamba(3, 2, dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), decoder_depths=(1, 1, 1, 1),
                 deep_supervision=True))
    loss = DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": True}, {},
                          weight_ce=1, weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    # nnU-Net's DDP weights without torch.compile: the lowest output keeps a tiny weight so all heads get grads
    weights = np.array([1, 0.5, 0.25, 1e-6])
    loss = DeepSupervisionWrapper(loss, weights / weights.sum())
    optimizer = torch.optim.AdamW(network.parameters(), 1e-3)
    generator = torch.Generator().manual_seed(rank)
    for _ in range(2):
        x = torch.randn(2, 3, 32, 32, generator=generator)
        targets = [torch.randint(0, 2, (2, 1, s, s), generator=generator).float() for s in (32, 8, 4, 2)]
        optimizer.zero_grad()
        loss(network(x), targets).backward()
        optimizer.step()
    checksum = sum(p.detach().double().sum().item() for p in network.module.parameters())
    Path(f"{result_file}.{rank}").write_text(repr(checksum))
    dist.destroy_process_group()


@pytest.mark.slow  # two processes, each importing torch and building the network
def test_two_process_ddp_keeps_ranks_in_sync(tmp_path):
    port = 29500 + os.getpid() % 1000
    mp.spawn(_train_two_steps, args=(2, port, str(tmp_path / "checksum")), nprocs=2, join=True)
    checksums = [float((tmp_path / f"checksum.{rank}").read_text()) for rank in range(2)]
    # different data on each rank, same weights after the synchronised steps
    assert checksums[0] == checksums[1]
