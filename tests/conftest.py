import os

import pytest
import torch

if not torch.cuda.is_available():
    # the fused Triton kernels run in Triton's CPU interpreter; it must be on before anything imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)
