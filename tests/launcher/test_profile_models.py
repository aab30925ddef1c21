"""Profiles with several models and upstreams: [[models]] with [models.engine] overrides, [[upstreams]], the
load policy, and the one-line errors that name both tables; the launch spec and the gateway's env mode."""
from __future__ import annotations

from pathlib import Path

import pytest

from launcher.launch import build_launch, gateway_upstream, startup_lines
from launcher.profile import ProfileError, engine_kwargs, load_profile

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "p.toml"
    path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(path))
    return message


def test_chat_and_embeddings_profile(monkeypatch):
    monkeypatch.delenv("LLM_OFFLINE", raising=False)
    p = load_profile(REPO / "profiles" / "chat-and-embeddings.toml")
    chat, embed = p.local_models
    assert chat.table == "[model]" and chat.model.names == ("HuggingFaceTB/SmolLM2-135M-Instruct", "smol")
    assert embed.table == "[[models]] #1" and embed.model.names[0] == "all-MiniLM-L6-v2"
    assert embed.model.max_model_len == 256
    # [models.engine] overrides [engine]; what it does not set comes from [engine]
    assert (embed.engine.max_num_batched_tokens, embed.engine.enable_prefix_caching) == (8192, False)
    assert embed.engine.kv_cache_gib == chat.engine.kv_cache_gib == 1.0
    assert chat.engine.max_num_batched_tokens == 2048


def test_models_upstreams_and_load_policy(tmp_path):
    p = load_profile(write(tmp_path, """
[model]
enabled = false

[[models]]
source = "org/a"
load = "on_demand"
keep_alive_s = 30
pricing = {input = 0.5, output = 1.5}
[models.engine]
max_num_seqs = 4

[[upstreams]]
name = "lab"
engine = "vllm"
base_url = "http://gpu:8000/v1/"
models = ["m1", "m2"]
prefix = "lab/"

[server]
max_loaded_models = 2
"""))
    [entry] = p.local_models
    assert (entry.model.load, entry.model.keep_alive_s, entry.engine.max_num_seqs) == ("on_demand", 30.0, 4)
    assert (entry.model.pricing.input, entry.model.pricing.output) == (0.5, 1.5)
    [up] = p.upstreams
    assert (up.name, up.base_url, up.models, up.prefix, up.timeout_s) == ("lab", "http://gpu:8000/v1", ("m1", "m2"),
                                                                          "lab/", 60.0)
    assert p.server.max_loaded_models == 2


def test_each_model_spreads_over_its_own_devices(tmp_path):
    p = load_profile(write(tmp_path, """
[model]
source = "org/big"

[distributed]
tensor_parallel_size = 2
backend = "gloo"

[[models]]
source = "org/small"
[models.distributed]
tensor_parallel_size = 1

[[models]]
source = "org/other"
"""))
    big, small, other = p.local_models
    assert (big.distributed.tensor_parallel_size, small.distributed.tensor_parallel_size,
            other.distributed.tensor_parallel_size) == (2, 1, 2)   # [models.distributed] over [distributed]
    assert small.distributed.backend == "gloo"
    kwargs = [engine_kwargs(p, entry) for entry in (big, small, other)]
    assert [k["tensor_parallel_size"] for k in kwargs] == [2, 1, 2]
    assert {k["distributed_backend"] for k in kwargs} == {"gloo"}


@pytest.mark.parametrize("text, expected", [
    ('[model]\nsource = "org/a"\n[[models]]\nsource = "org/a"\n',
     "served name 'org/a' is claimed by both [model] and [[models]] #1"),
    ('[[models]]\nsource = "org/b"\nserved_names = ["x"]\n[[models]]\nsource = "org/c"\nserved_names = ["x"]\n',
     "served name 'x' is claimed by both [[models]] #1 and [[models]] #2"),
    ('[[upstreams]]\nname = "u"\nengine = "vllm"\nbase_url = "http://h/v1"\nmodels = ["HuggingFaceTB/SmolLM2-135M-Instruct"]\n',
     "claimed by both [model] and [[upstreams]] #1"),
    ('[[models]]\nsource = "org/b"\nsauce = 1\n', "[[models]] #1: models.sauce: unknown key"),
    ('[[models]]\nsource = "org/b"\n[models.engine]\nblok_size = 16\n',
     "[[models]] #1: models.engine.blok_size: unknown key (did you mean models.engine.block_size?)"),
    ('[[models]]\nserved_names = ["b"]\n', "[[models]] #1: models.source: required"),
    ('[[models]]\nsource = "org/b"\nload = "lazy"\n', "models.load: must be one of 'at_start', 'on_demand'"),
    ('[[upstreams]]\nengine = "vllm"\nbase_url = "http://h/v1"\n', "[[upstreams]] #1: upstreams.name: required"),
    ('[[upstreams]]\nname = "u"\nengine = "vllm"\n', "upstreams.base_url: required for engine 'vllm'"),
    ('[[upstreams]]\nname = "u"\nengine = "skynet"\nbase_url = "http://h/v1"\n', "upstreams.engine: must be one of"),
    ('[[upstreams]]\nname = "u"\nengine = "vllm"\nbase_url = "ftp://h"\n', "upstreams.base_url: must be an http(s) URL"),
    ('[[upstreams]]\nname = "u"\nbase_url = "http://a/v1"\n[[upstreams]]\nname = "u"\nbase_url = "http://b/v1"\n',
     "upstream name 'u' is used by both [[upstreams]] #1 and [[upstreams]] #2"),
    ('[[models]]\nsource = "org/b"\npricing = {input = -1}\n', "models.pricing: must be a table"),
    ('models = 3\n', "models: must be an array of tables ([[models]])"),
    ('[[models]]\nsource = "org/b"\n[models.distributed]\nreplicas = 2\n',
     "models.distributed.replicas: set it in [distributed] (replicas hold every model)"),
    ('[[models]]\nsource = "org/b"\n[models.distributed]\ntensor_parallel_size = 0\n',
     "models.distributed.tensor_parallel_size: must be"),
])
def test_errors_name_the_tables(tmp_path, text, expected):
    assert expected in error_of(tmp_path, text)


def test_launch_spec_resolves_every_model_and_adds_the_gateway_upstream(tmp_path):
    p = load_profile(write(tmp_path, """
[model]
source = "org/a"
[[models]]
source = "org/b"
load = "on_demand"
[[models]]
source = "org/c"
enabled = false
[[upstreams]]
name = "openai"
engine = "openai"
api_key_env = "MY_OPENAI"
"""))
    resolved = []

    def resolve(source, revision=None, offline=False):
        resolved.append(source)
        return tmp_path / source.replace("/", "--")

    env = {"MAIN_MODEL_ENGINE": "vllm", "MAIN_MODEL_BASE_URL": "http://b:8000/v1/"}
    spec = build_launch(p, resolve, env)
    assert resolved == ["org/a", "org/b"]   # a disabled model is never fetched
    assert [m.served_model_names for m in spec.models] == [("org/a",), ("org/b",)]
    assert [m.load for m in spec.models] == ["at_start", "on_demand"]
    openai, gateway = spec.upstreams
    assert (openai.base_url, openai.api_key_env) == ("https://api.openai.com/v1", "MY_OPENAI")
    assert (gateway.name, gateway.engine, gateway.base_url, gateway.models) == ("vllm", "vllm", "http://b:8000/v1",
                                                                                ("*",))
    lines = startup_lines(spec, env)
    assert lines[1] == "llm: upstream 'vllm' (vllm) at http://b:8000/v1: every model it lists; no key"
    assert "key from $MY_OPENAI (unset)" in lines[0]


def test_gateway_env_mode_follows_the_document():
    assert gateway_upstream({}) is None
    openai = gateway_upstream({"MAIN_MODEL_ENGINE": "openai", "OPENAI_API_KEY": "k"})
    assert (openai.base_url, openai.api_key_env) == ("https://api.openai.com/v1", "OPENAI_API_KEY")
    azure = gateway_upstream({"MAIN_MODEL_ENGINE": "azure_openai", "AZURE_OPENAI_ENDPOINT": "https://r.openai.azure.com"})
    assert (azure.engine, azure.base_url, azure.api_version) == ("azure", "https://r.openai.azure.com", "2024-06-01")
    cohere = gateway_upstream({"MAIN_MODEL_ENGINE": "cohere", "COHERE_BASE_URL": "https://c.example.com"})
    assert (cohere.base_url, cohere.api_key_env) == ("https://c.example.com", "COHERE_API_KEY")
    assert gateway_upstream({"MAIN_MODEL_ENGINE": "anthropic"}).base_url == "https://api.anthropic.com"
    custom = gateway_upstream({"MAIN_MODEL_ENGINE": "my-custom-engine", "MAIN_MODEL_BASE_URL": "http://p:8080/v1"})
    assert (custom.name, custom.engine, custom.base_url) == ("my-custom-engine", "custom", "http://p:8080/v1")
    # not in the table and no base URL: an empty list, not an error
    assert gateway_upstream({"MAIN_MODEL_ENGINE": "mystery"}).base_url is None
