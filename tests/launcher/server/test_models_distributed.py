"""[models.distributed]: one server, the same random checkpoint served twice — tensor parallel over two gloo
ranks as [model] ([distributed] tensor_parallel_size = 2) and in one process as a [[models]] entry
([models.distributed] tensor_parallel_size = 1): each its own engine processes, the same greedy text."""
import pytest

from tests.launcher.server.conftest import start_server
from tests.launcher.server.test_server_pooling import post
from tests.launcher.server.vision_model import save_tiny_llama

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(default_gguf_path, tmp_path_factory):
    llama = save_tiny_llama(default_gguf_path, tmp_path_factory.mktemp("llama"))
    srv = start_server(f"""
[model]
source = "{llama}"
served_names = ["tp2"]

[engine]
device = "cpu"
kv_cache_gib = 0.05

[distributed]
tensor_parallel_size = 2

[[models]]
source = "{llama}"
served_names = ["tp1"]
[models.distributed]
tensor_parallel_size = 1
""", tmp_path_factory.mktemp("tp"), model_path=str(llama))
    try:
        yield srv
    finally:
        srv.stop()


def test_each_model_runs_with_its_own_tensor_parallel_size(server):
    engines = [cmd for cmd in _cmdlines(server) if "engine.core_process" in cmd or "engine.tp_worker" in cmd]
    assert len(engines) == 3, engines     # tp2: rank 0 + one worker; tp1: one process
    body = {"prompt": "The colour of the sky is", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    tp2 = post(server, "/v1/completions", {**body, "model": "tp2"})["choices"][0]["text"]
    tp1 = post(server, "/v1/completions", {**body, "model": "tp1"})["choices"][0]["text"]
    assert tp2 == tp1 and tp2


def _cmdlines(server) -> list[str]:
    out = []
    for pid in server.descendants():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                out.append(f.read().replace(b"\0", b" ").decode())
        except OSError:
            pass
    return out
