"""On-demand models (llama.cpp's router mode, Ollama's keep_alive): unloaded at start, loaded by their first
request, unloaded after keep_alive_s idle (the engine process ends), least recently used out at
server.max_loaded_models."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.launcher.server.conftest import start_server

KEEP_ALIVE_S = 4
CHAT = {"model": "smol", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def srv(default_gguf_path, minilm_dir, tmp_path_factory):
    server = start_server(f"""
[model]
source = "{default_gguf_path}"
served_names = ["smol"]
load = "on_demand"
keep_alive_s = {KEEP_ALIVE_S}
max_model_len = 1024

[engine]
device = "cpu"
kv_cache_gib = 0.1

[[models]]
source = "{minilm_dir}"
served_names = ["minilm"]
load = "on_demand"
keep_alive_s = 600
max_model_len = 256
""", tmp_path_factory.mktemp("on_demand"), api_key=None, model_path=default_gguf_path,
        server_extra="max_loaded_models = 1")
    yield server
    server.stop()


def statuses(server) -> dict[str, str]:
    return {m["id"]: m["status"] for m in httpx.get(server.url + "/v1/models", timeout=60).json()["data"]}


def engines(server) -> list[int]:
    """The engine processes under the server (each local model that is loaded has one)."""
    found = []
    for pid in server.descendants():
        try:
            if b"engine.core_process" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            pass
    return found


def wait_for(condition, timeout_s: float = 60) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def test_nothing_is_loaded_at_start(srv):
    assert statuses(srv) == {"smol": "unloaded", "minilm": "unloaded"}
    assert engines(srv) == []
    cards = {m["id"]: m for m in httpx.get(srv.url + "/v1/models", timeout=60).json()["data"]}
    assert cards["smol"]["context_window"] == 1024
    assert cards["minilm"]["capabilities"] == ["embedding", "score", "rerank", "pooling"]


def test_the_first_request_loads_the_model_and_waits_for_it(srv):
    seen: set[str] = set()
    done = threading.Event()
    result = {}

    def first_request():
        result["response"] = httpx.post(srv.url + "/v1/chat/completions", json=CHAT, timeout=300)
        done.set()

    threading.Thread(target=first_request, daemon=True).start()
    while not done.is_set():
        seen.add(statuses(srv)["smol"])
        time.sleep(0.05)
    assert result["response"].status_code == 200, result["response"].text
    assert "loading" in seen
    assert statuses(srv)["smol"] == "loaded" and len(engines(srv)) == 1


def test_an_idle_model_is_unloaded_after_keep_alive(srv):
    httpx.post(srv.url + "/v1/chat/completions", json=CHAT, timeout=300).raise_for_status()
    finished = time.monotonic()
    assert wait_for(lambda: statuses(srv)["smol"] == "unloaded")
    assert time.monotonic() - finished >= KEEP_ALIVE_S - 0.5   # not before keep_alive_s
    assert wait_for(lambda: engines(srv) == [])                # its process is gone


def test_the_least_recently_used_model_makes_room(srv):
    httpx.post(srv.url + "/v1/chat/completions", json=CHAT, timeout=300).raise_for_status()
    assert statuses(srv)["smol"] == "loaded"
    r = httpx.post(srv.url + "/v1/embeddings", json={"model": "minilm", "input": ["hello"]}, timeout=300)
    assert r.status_code == 200, r.text
    assert statuses(srv) == {"smol": "unloaded", "minilm": "loaded"}   # max_loaded_models = 1
    assert wait_for(lambda: len(engines(srv)) == 1)
    httpx.post(srv.url + "/v1/chat/completions", json=CHAT, timeout=300).raise_for_status()
    assert statuses(srv) == {"smol": "loaded", "minilm": "unloaded"}
