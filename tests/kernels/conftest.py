"""Kernel tests: without CUDA the Triton kernels run under the interpreter on CPU tensors (tests/conftest.py
sets TRITON_INTERPRET before any test module is collected)."""
import pytest
import torch


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where the small-shape tests run: the GPU when there is one, else the CPU under the interpreter."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
