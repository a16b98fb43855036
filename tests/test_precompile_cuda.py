"""Compiling a training step's Triton kernels ahead on a real GPU, from an empty kernel cache: the dry step compiles
every variant the step needs (the step itself then compiles none) and leaves the step's results unchanged."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Run in a fresh process so that Triton's in-memory and on-disk caches start empty.
_SCRIPT = """
import copy, json, sys
import torch
from nnunetv2_sa_umamba.architectures.sa_umamba import SAUMamba
from nnunetv2_sa_umamba.ops.compile_stats import record_compilations
from nnunetv2_sa_umamba.training.precompile import precompile_training_step

torch.manual_seed(0)
network = SAUMamba(3, 2, dims=(24, 48, 96, 192), deep_supervision=True).cuda().train()
twin = copy.deepcopy(network)
x = torch.randn(2, 3, 64, 64, device="cuda")
target = torch.randint(0, 2, (2, 64, 64), device="cuda")

def step(net):
    torch.manual_seed(1)  # the same drop-path draws in both networks
    with torch.autocast("cuda", dtype=torch.float16):
        loss = torch.nn.functional.cross_entropy(net(x)[0], target)
    loss.backward()
    return loss.item(), [p.grad.clone() for p in net.parameters() if p.grad is not None]

ahead = precompile_training_step(network, x, torch.float16)
with record_compilations() as in_step:
    loss, grads = step(network)
twin_loss, twin_grads = step(twin)
print(json.dumps({"ahead": len(ahead.compiled), "in_step": len(in_step.compiled), "loss": loss, "twin_loss": twin_loss,
                  "grad_rel_diff": max(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
                                       for a, b in zip(grads, twin_grads, strict=True)),
                  "buffers_equal": all(torch.equal(a, b) for a, b in zip(network.buffers(), twin.buffers()))}))
"""


@pytest.mark.cuda
def test_precompiled_step_compiles_nothing_and_trains_as_without(tmp_path):
    import torch
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path / "triton"), "TRITON_INTERPRET": "0",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    child = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    result = json.loads(child.stdout.strip().splitlines()[-1])
    print(result)
    assert result["ahead"] > 10 and result["in_step"] == 0
    # the same kernels, the same values (up to the order of the scan backward's atomic adds)
    assert result["loss"] == pytest.approx(result["twin_loss"], rel=1e-6) and result["buffers_equal"]
    assert result["grad_rel_diff"] < 1e-3
