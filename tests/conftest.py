"""Test setup: without a CUDA GPU, the Triton kernels run in Triton's CPU interpreter.

``TRITON_INTERPRET`` is read when a kernel is decorated, so it is set here, before any
test module imports the kernel files. With a GPU present the same tests run compiled.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (compiled Triton or bf16)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> str:
    return DEVICE
