"""Kernel tests: without CUDA the Triton kernels run under the interpreter on CPU tensors.

NOTE: triton reads TRITON_INTERPRET when @triton.jit decorates a function, so it is set here, before any
test module imports a kernel module.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where the small-shape tests run: the GPU when there is one, else the CPU under the interpreter."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
