"""engine/packed_cache.py: a GGUF model's second CPU load maps what the first packed, equal to a fresh load."""
import os
from pathlib import Path

import pytest
import torch
from gguf.constants import GGMLQuantizationType as QT

from engine import packed_cache
from engine.loader import ModelFiles, load_config, load_model
from kernels import cpu_build
from tests.engine.test_gguf import write_tiny

pytestmark = pytest.mark.skipif(cpu_build.load_library() is None, reason="CPU kernels not built")


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LLM_HOME", str(tmp_path / "home"))
    return tmp_path / "home" / "packed"


@pytest.fixture
def gguf_path(tmp_path) -> Path:
    # Q4_1 and Q8_0 matrices (both packed), an untied LM head
    return write_tiny(tmp_path / "m.gguf", "llama", tied=False, matrix_qtypes=[QT.Q4_1, QT.Q8_0])


def load(path: Path, **kw) -> torch.nn.Module:
    files = ModelFiles.at(path)
    return load_model(files, load_config(files), torch.float32, torch.device("cpu"), 256, cpu_kernels=True, **kw)


def assert_same_model(a: torch.nn.Module, b: torch.nn.Module) -> None:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name], pb[name]) and pa[name].stride() == pb[name].stride(), name
    packed_a = {n: m.packed for n, m in a.named_modules() if getattr(m, "packed", None) is not None}
    packed_b = {n: m.packed for n, m in b.named_modules() if getattr(m, "packed", None) is not None}
    assert packed_a.keys() == packed_b.keys() and packed_a
    for name, w in packed_a.items():
        v = packed_b[name]
        assert (w.bits, w.group, w.out_features, w.in_features, w.activations) == \
            (v.bits, v.group, v.out_features, v.in_features, v.activations)
        for t, u in ((w.data, v.data), (w.scale, v.scale), (w.zero, v.zero)):
            assert (t is None and u is None) or torch.equal(t, u), name
    assert torch.equal(a.cos_sin_cache, b.cos_sin_cache)


def logits(model: torch.nn.Module) -> torch.Tensor:
    x = torch.randn(3, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    return model.compute_logits(x)


@pytest.mark.parametrize("float_copies,int8", [(False, False), (True, False), (False, True)])
def test_second_load_maps_the_first_ones_weights(home, gguf_path, monkeypatch, float_copies, int8):
    fresh = load(gguf_path, weight_cache=False, float_copies=float_copies, quantized_activations=int8)
    assert not home.exists()
    first = load(gguf_path, float_copies=float_copies, quantized_activations=int8)
    assert len(list(home.glob("*.pt"))) == 1
    # the second load must not read a single quantized tensor from the GGUF file
    from engine.gguf import GGUFFile
    monkeypatch.setattr(GGUFFile, "iter_quantized", lambda self: pytest.fail("dequantized again"))
    monkeypatch.setattr(GGUFFile, "iter_tensors", lambda self, *a: pytest.fail("read again"))
    second = load(gguf_path, float_copies=float_copies, quantized_activations=int8)
    assert_same_model(fresh, first)
    assert_same_model(fresh, second)
    assert torch.equal(logits(fresh), logits(second))
    assert (second.layers[0].self_attn.qkv_proj.weight is None) == (not float_copies)


def test_options_keep_their_own_caches(home, gguf_path):
    load(gguf_path, float_copies=False)
    load(gguf_path, float_copies=True)
    load(gguf_path, float_copies=False, quantized_activations=True)
    assert len(list(home.glob("*.pt"))) == 3


def test_a_changed_file_is_packed_again_and_its_old_cache_removed(home, gguf_path, tmp_path):
    load(gguf_path)
    (old,) = home.glob("*.pt")
    write_tiny(tmp_path / "other.gguf", "llama", tied=False, matrix_qtypes=[QT.Q8_0])
    os.replace(tmp_path / "other.gguf", gguf_path)   # same path, new contents (and size, mtime)
    model = load(gguf_path)
    assert_same_model(load(gguf_path, weight_cache=False), model)
    (new,) = home.glob("*.pt")
    assert new != old


def test_a_damaged_cache_is_rebuilt(home, gguf_path, caplog):
    fresh = load(gguf_path, weight_cache=False)
    load(gguf_path)
    (cache,) = home.glob("*.pt")
    cache.write_bytes(cache.read_bytes()[:1000])
    assert_same_model(fresh, load(gguf_path))
    assert "unreadable" in caplog.text
    assert_same_model(fresh, load(gguf_path))   # and written again, whole


def test_caches_of_deleted_files_are_pruned(home, gguf_path, tmp_path):
    other = write_tiny(tmp_path / "gone.gguf", "llama", matrix_qtypes=[QT.Q4_1])
    load(other)
    other.unlink()
    load(gguf_path)
    assert [p.name.startswith("m-") for p in home.glob("*.pt")] == [True]
    assert len(list(home.glob("*.source"))) == 1


def test_unwritable_home_still_loads(tmp_path, monkeypatch, gguf_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("LLM_HOME", str(blocker))   # a file: the packed/ folder cannot be made
    fresh = load(gguf_path, weight_cache=False)
    assert_same_model(fresh, load(gguf_path))
    assert "not cached" in caplog.text


def test_path_changes_with_options_and_file(gguf_path, home):
    files = ModelFiles.at(gguf_path)
    model = load(gguf_path, weight_cache=False)
    a = packed_cache.cache_path(files, model, {"float_copies": None})
    assert a == packed_cache.cache_path(files, model, {"float_copies": None})
    assert a != packed_cache.cache_path(files, model, {"float_copies": True})
