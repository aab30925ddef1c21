"""Profile parsing: the shipped profiles, every kind of invalid value, and flag override precedence."""
import dataclasses
import re
from pathlib import Path

import pytest

from launcher.model_catalog import find_profile
from launcher.profile import (ProfileError, Profile, apply_overrides, default_profile, engine_kwargs, load_profile,
                              profile_reference, reference_markdown)

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str, name: str = "p.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    message = str(info.value)
    assert "\n" not in message, "errors are one line"
    assert message.startswith(str(path)), "errors name the file"
    return message


def test_default_toml_matches_builtin_default(monkeypatch):
    monkeypatch.delenv("LLM_OFFLINE", raising=False)
    loaded = load_profile(REPO / "profiles" / "default.toml")
    builtin = default_profile()
    for section in ("model", "engine", "kernels", "distributed", "server", "defaults"):
        assert getattr(loaded, section) == getattr(builtin, section), section
    assert loaded.path == str(REPO / "profiles" / "default.toml")
    assert loaded.model.names == ("HuggingFaceTB/SmolLM2-135M-Instruct",)


def test_shipped_profiles_parse():
    emb = load_profile(REPO / "profiles" / "embedding-minilm.toml")
    assert emb.model.source == "sentence-transformers/all-MiniLM-L6-v2"
    assert emb.model.names[0] == "all-MiniLM-L6-v2"
    assert emb.model.max_model_len == 256
    big = load_profile(REPO / "profiles" / "llama3-8b-gpu.toml")
    assert (big.engine.device, big.model.dtype, big.engine.kv_cache_memory_fraction) == ("cuda", "bfloat16", 0.9)
    assert big.engine.cuda_graph_sizes[:3] == (1, 2, 4) and big.server.api_key_env == "LLM_API_KEYS"
    assert big.defaults.sampling_overrides() == {"temperature": 0.6, "top_p": 0.9}


def test_values_are_typed_and_frozen(tmp_path):
    p = load_profile(write(tmp_path, '[engine]\nkv_cache_gib = 3\ncuda_graph_sizes = [1, 2]\n'
                                     '[server]\napi_keys = ["a", "b"]\n[model]\nmax_model_len = "auto"\n'))
    assert p.engine.kv_cache_gib == 3.0 and isinstance(p.engine.kv_cache_gib, float)
    assert p.engine.cuda_graph_sizes == (1, 2) and p.server.api_keys == ("a", "b")
    assert p.model.max_model_len == "auto"
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.engine.block_size = 32
    assert hash(p.engine) == hash(dataclasses.replace(p.engine))


def test_relative_paths_resolve_against_profile_folder(tmp_path):
    sub = tmp_path / "conf"
    sub.mkdir()
    (sub / "models").mkdir()
    p = load_profile(write(sub, '[model]\nsource = "./models/m.gguf"\nchat_template = "t.jinja"\n'
                                '[kernels]\ncache_dir = "tune"\n'))
    assert p.model.source == str(sub / "models" / "m.gguf")
    assert p.model.chat_template == str(sub / "t.jinja")
    assert p.kernels.cache_dir == str(sub / "tune")
    assert p.model.names == ("m.gguf",)
    # a repo id stays a repo id
    assert load_profile(write(sub, '[model]\nsource = "org/name"\n')).model.source == "org/name"


@pytest.mark.parametrize("text, key, allowed", [
    ("[enigne]\ndevice = 'cpu'\n", "[enigne]", "allowed: description, [model], [engine]"),
    ("[engine]\nblok_size = 16\n", "engine.blok_size", "did you mean engine.block_size"),
    ("[server]\nport = '8000'\n", "server.port", "an integer >= 0 and <= 65535"),
    ("[server]\nport = 70000\n", "server.port", "<= 65535, got 70000"),
    ("[engine]\nmax_num_seqs = 0\n", "engine.max_num_seqs", "an integer >= 1, got 0"),
    ("[engine]\nmax_num_seqs = true\n", "engine.max_num_seqs", "an integer >= 1, got True"),
    ("[engine]\ndevice = 'tpu'\n", "engine.device", "one of 'auto', 'cuda', 'cpu'"),
    ("[engine]\nblock_size = 12\n", "engine.block_size", "one of 8, 16, 32, 64, 128"),
    ("[model]\ndtype = 'fp8'\n", "model.dtype", "one of 'auto', 'float32', 'float16', 'bfloat16'"),
    ("[model]\nmax_model_len = 'big'\n", "model.max_model_len", '"auto" or an integer >= 1'),
    ("[model]\noffline = 'yes'\n", "model.offline", "true or false"),
    ("[model]\nserved_names = 'x'\n", "model.served_names", "a list of strings"),
    ("[engine]\nkv_cache_memory_fraction = 1.5\n", "engine.kv_cache_memory_fraction", "> 0 and <= 1"),
    ("[engine]\nkv_cache_memory_fraction = 0\n", "engine.kv_cache_memory_fraction", "> 0 and <= 1, got 0"),
    ("[engine]\ncuda_graph_sizes = [1, 0]\n", "engine.cuda_graph_sizes", "a list of integers >= 1"),
    ("[defaults]\ntop_p = 0.0\n", "defaults.top_p", "> 0 and <= 1"),
    ("[defaults]\npresence_penalty = 3\n", "defaults.presence_penalty", ">= -2 and <= 2"),
    ("[engine]\nkv_cache_memory_fraction = 0.5\nkv_cache_gib = 4\n", "engine.kv_cache_gib",
     "set either engine.kv_cache_memory_fraction or engine.kv_cache_gib, not both"),
    ("[server]\napi_keys = ['k']\napi_key_env = 'KEYS'\n", "server.api_key_env", "not both"),
    ("engine = 3\n", "engine", "must be a table"),
    ("[engine\n", "invalid TOML", ""),
])
def test_invalid_profiles_name_file_and_key(tmp_path, text, key, allowed):
    message = error_of(tmp_path, text)
    assert f": {key}" in message, message
    assert allowed in message, message


def test_missing_profile_is_profile_error(tmp_path):
    with pytest.raises(ProfileError, match="profile not found"):
        load_profile(tmp_path / "nope.toml")
    with pytest.raises(ProfileError, match=r"no such profile \(looked for nope-nope.toml in"):
        find_profile("nope-nope")


def test_find_profile_by_name_prefers_user_dir_over_shipped(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LLM_HOME", str(tmp_path / "home"))
    assert find_profile("default") == REPO / "profiles" / "default.toml"
    user = tmp_path / "home" / "profiles"
    user.mkdir(parents=True)
    write(user, "[server]\nport = 1234\n", "default.toml")
    assert find_profile("default") == user / "default.toml"
    assert load_profile(find_profile("default")).server.port == 1234


def test_overrides_win_and_never_mutate(tmp_path):
    base = load_profile(write(tmp_path, "[server]\nport = 8001\nhost = '0.0.0.0'\napi_key_env = 'KEYS'\n"
                                        "[engine]\ndevice = 'cuda'\nkv_cache_memory_fraction = 0.5\n"))
    new = apply_overrides(base, port=9000, device="cpu", api_key="secret", host=None, kv_cache_gib=2,
                          **{"engine.block_size": 32, "model.max_model_len": "auto"})
    assert (new.server.port, new.server.host, new.engine.device) == (9000, "0.0.0.0", "cpu")
    # a flag for one of two exclusive keys replaces the file's other one
    assert new.server.api_keys == ("secret",) and new.server.api_key_env is None
    assert new.engine.kv_cache_gib == 2.0 and new.engine.kv_cache_memory_fraction is None
    assert new.engine.block_size == 32 and new.model.max_model_len == "auto"
    # the original is untouched
    assert (base.server.port, base.engine.device, base.server.api_key_env) == (8001, "cuda", "KEYS")
    assert apply_overrides(base) == base


def test_bad_overrides_are_profile_errors():
    with pytest.raises(ProfileError, match=r"^command line: server.port: must be an integer >= 0"):
        apply_overrides(default_profile(), port=-1)
    with pytest.raises(ProfileError, match="colour: unknown flag"):
        apply_overrides(default_profile(), colour="red")
    with pytest.raises(ProfileError, match=r"engine.blocksize: unknown key \(did you mean engine.block_size"):
        apply_overrides(default_profile(), **{"engine.blocksize": 8})


def test_offline_default_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LLM_OFFLINE", "1")
    assert default_profile().model.offline is True
    assert load_profile(write(tmp_path, "")).model.offline is True
    assert load_profile(write(tmp_path, "[model]\noffline = false\n")).model.offline is False
    monkeypatch.setenv("LLM_OFFLINE", "0")
    assert default_profile().model.offline is False


def test_api_key_env_resolution():
    server = apply_overrides(default_profile(), **{"server.api_key_env": "MY_KEYS"}).server
    assert server.resolve_api_keys({"MY_KEYS": "a, b,"}) == ("a", "b")
    with pytest.raises(ProfileError, match="MY_KEYS is unset or empty"):
        server.resolve_api_keys({})
    assert default_profile().server.resolve_api_keys({}) == ()


def test_engine_kwargs_leave_unset_keys_to_the_engine():
    from engine.config import EngineConfig  # the consumer of these kwargs
    kwargs = engine_kwargs(default_profile())
    assert "kv_cache_gib" not in kwargs and "max_model_len" not in kwargs
    config = EngineConfig(model="/x.gguf", **kwargs)
    assert config.served_name == "HuggingFaceTB/SmolLM2-135M-Instruct" and config.block_size == 16


def test_reference_covers_every_key():
    rows = profile_reference()
    keys = {r[0] for r in rows}
    for section in ("model", "engine", "kernels", "distributed", "server", "defaults"):
        for f in dataclasses.fields(getattr(Profile(), section)):
            assert f"{section}.{f.name}" in keys
    assert all(doc for *_, doc in rows)
    table = reference_markdown()
    assert table.count("\n") == len(rows) + 1
    docs = (REPO / "docs" / "profiles.md").read_text()
    assert table in docs, "docs/profiles.md is stale: regenerate it with reference_markdown()"
    assert re.search(r"`engine.block_size` \| `16`", table)
