"""Compiling a training step's Triton kernels ahead on a real GPU, from an empty kernel cache: the dry step compiles
every variant the step needs (the step itself then compiles none) and leaves the network as it was: its step's loss,
gradients and batch statistics differ from an untouched copy's no more than two untouched copies differ."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Run in a fresh process so that Triton's in-memory and on-disk caches start empty.
_SCRIPT = """
import copy, json
import torch
from nnunetv2_sa_umamba.architectures.sa_umamba import SAUMamba
from nnunetv2_sa_umamba.ops.compile_stats import record_compilations
from nnunetv2_sa_umamba.training.precompile import precompile_training_step

torch.manual_seed(0)
network = SAUMamba(3, 2, dims=(24, 48, 96, 192), deep_supervision=True).cuda().train()
twin, twin2 = copy.deepcopy(network), copy.deepcopy(network)
x = torch.randn(2, 3, 64, 64, device="cuda")
target = torch.randint(0, 2, (2, 64, 64), device="cuda")

def step(net):
    torch.manual_seed(1)  # the same drop-path draws in every network
    with torch.autocast("cuda", dtype=torch.float16):
        loss = torch.nn.functional.cross_entropy(net(x)[0], target)
    loss.backward()
    return loss.item(), [p.grad for p in net.parameters()], list(net.buffers())

def worst(pairs):
    # largest relative difference over tensors; None gradients must match
    out = 0.0
    for a, b in pairs:
        assert (a is None) == (b is None)
        if a is not None:
            out = max(out, ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item())
    return out

ahead = precompile_training_step(network, x, torch.float16)
with record_compilations() as in_step:
    result = step(network)
reference, noise = step(twin), step(twin2)

def differences(a, b):
    return {"loss": abs(a[0] - b[0]), "grads": worst(zip(a[1], b[1], strict=True)),
            "buffers": worst(zip(a[2], b[2], strict=True))}

print(json.dumps({"ahead": len(ahead.compiled), "in_step": len(in_step.compiled),
                  "precompiled_vs_plain": differences(result, reference),
                  "plain_vs_plain": differences(noise, reference)}))
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
    # Two untouched copies already differ a little (atomic adds in the scan's backward and the fused RFAConv's
    # batch statistics); the pre-compiled network may differ from one by no more than that run-to-run noise.
    for key, noise in result["plain_vs_plain"].items():
        assert result["precompiled_vs_plain"][key] <= 10 * noise + 1e-5, key
