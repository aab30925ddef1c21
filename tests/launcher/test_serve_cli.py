"""`llm serve` as a user runs it: the ready line, a request, `llm list --url`, SIGTERM / SIGINT with no process
left behind, and startups that fail well (KV budget too small, model missing offline)."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from engine.weights import DEFAULT_MODEL

REPO = Path(__file__).resolve().parents[2]
LLM = Path(sys.executable).parent / "llm"      # the console script pyproject.toml installs
READY = re.compile(r"^llm: serving (?P<name>\S+)(?: \(aliases: (?P<aliases>[^)]*)\))? at (?P<url>\S+)/v1 \| "
                   r"device (?P<device>\S+) \| KV cache (?P<kv>\d+) tokens \| max_model_len (?P<mml>\d+) \| "
                   r"ready in (?P<seconds>[\d.]+)s$")
STARTUP_TIMEOUT_S = 180


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def kv_capacity_tokens(gguf_path: str, gib: float, block_size: int = 16, dtype_bytes: int = 2) -> int:
    """Tokens a KV budget holds, from the GGUF's own metadata: whole blocks of K and V for every layer
    (float16 elements: the CPU default's cache beside its int8 activations)."""
    from gguf import GGUFReader
    fields = GGUFReader(gguf_path).fields

    def meta(key: str) -> int:
        field = fields[key]
        return int(field.parts[field.data[0]][0])

    head_dim = meta("llama.embedding_length") // meta("llama.attention.head_count")
    per_block = 2 * meta("llama.block_count") * block_size * meta("llama.attention.head_count_kv") * head_dim \
        * dtype_bytes
    return int(gib * 2**30 // per_block) * block_size


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every live (non-zombie) process, read from /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except (OSError, IndexError):
                continue
            if stat[0] != "Z":
                table[int(entry.name)] = (int(stat[1]), cmdline)
    return table


def descendants(pid: int) -> dict[int, str]:
    """pid -> command line of every process below `pid`."""
    table = _processes()
    found, todo = {}, [pid]
    while todo:
        parent = todo.pop()
        for child, (ppid, cmdline) in table.items():
            if ppid == parent and child not in found:
                found[child] = cmdline
                todo.append(child)
    return found


def _profile(tmp: Path, body: str) -> Path:
    path = tmp / "serve.toml"
    path.write_text(body)
    return path


def _pump(stream, sink: list[str]) -> None:
    for line in stream:
        sink.append(line.rstrip("\n"))


def _run_failing(argv: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=STARTUP_TIMEOUT_S,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("stop_signal,entry", [(signal.SIGTERM, "script"), (signal.SIGINT, "module")],
                         ids=["SIGTERM-llm-script", "SIGINT-python-m-launcher.cli"])
def test_serve_ready_request_and_clean_stop(default_gguf_path, tmp_path, stop_signal, entry):
    port = _free_port()
    profile = _profile(tmp_path, f"""
[model]
source = "{DEFAULT_MODEL}"
served_names = ["smol-a", "smol-b"]
max_model_len = 1024

[engine]
device = "cpu"
kv_cache_gib = 0.25
""")
    assert LLM.exists(), f"the console script is missing: {LLM}"
    argv = [str(LLM)] if entry == "script" else [sys.executable, "-m", "launcher.cli"]
    started = time.monotonic()
    proc = subprocess.Popen([*argv, "serve", str(profile), "--port", str(port), "--offline"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: list[str] = []
    errors: list[str] = []
    for stream, sink in ((proc.stdout, lines), (proc.stderr, errors)):
        threading.Thread(target=_pump, args=(stream, sink), daemon=True).start()
    try:
        while not lines:
            assert proc.poll() is None, f"llm serve exited {proc.returncode}:\n" + "\n".join(errors)
            assert time.monotonic() - started < STARTUP_TIMEOUT_S, "no ready line:\n" + "\n".join(errors)
            time.sleep(0.1)
        elapsed = time.monotonic() - started
        ready = READY.match(lines[0])
        assert ready, lines[0]
        url = f"http://127.0.0.1:{port}"
        assert ready["url"] == url and ready["name"] == "smol-a" and ready["aliases"] == "smol-b"
        assert ready["device"] == "cpu" and int(ready["mml"]) == 1024
        assert int(ready["kv"]) == kv_capacity_tokens(default_gguf_path, 0.25)
        assert 0 < float(ready["seconds"]) <= elapsed + 0.1
        # Phases are printed as the launcher's polls see them: a fast start (weights mapped from the packed
        # cache) may pass one between two polls, so the check is that those shown came in startup order, once.
        shown = [line[len("llm: "):-len(" ...")] for line in errors
                 if line.startswith("llm: ") and line.endswith(" ...")]
        order = ["starting engine process", "loading weights", "allocating KV cache", "loading tokenizer"]
        assert all(phase in order for phase in shown), shown
        assert shown == sorted(set(shown), key=order.index), shown

        body = json.dumps({"model": "smol-b", "prompt": "The capital of France is", "max_tokens": 4,
                           "temperature": 0, "ignore_eos": True}).encode()
        request = urllib.request.Request(url + "/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
        assert answer["usage"]["completion_tokens"] == 4 and answer["choices"][0]["text"]

        listed = subprocess.run([*argv, "list", "--json", "--url", url, "--provider", "server"], cwd=REPO,
                                capture_output=True, text=True, timeout=60)
        assert listed.returncode == 0, listed.stderr
        served = json.loads(listed.stdout)["server"]
        assert served["url"] == url
        assert [m["id"] for m in served["models"]] == ["smol-a", "smol-b"]
        assert {m["max_model_len"] for m in served["models"]} == {1024}

        children = descendants(proc.pid)
        assert len(children) >= 2, children          # the server process and the engine process under it
        assert any("launcher.server" in cmd for cmd in children.values())
        proc.send_signal(stop_signal)
        assert proc.wait(60) == 0, "\n".join(errors)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    deadline = time.monotonic() + 10
    while True:   # the supervisor waited for its child, so this should hold at once; allow /proc a moment
        alive = {pid: cmd for pid, (_, cmd) in _processes().items() if children.get(pid) == cmd}
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not alive, f"left behind after {stop_signal.name}: {alive}"
    assert errors[-1] == "llm: server stopped"
    assert not any("Traceback" in line for line in errors), "\n".join(errors)


def test_kv_budget_too_small_names_the_largest_max_model_len(default_gguf_path, tmp_path):
    gib = 0.01
    fits = kv_capacity_tokens(default_gguf_path, gib)
    assert 0 < fits < 2048
    profile = _profile(tmp_path, f"""
[model]
source = "{default_gguf_path}"
max_model_len = 2048

[engine]
device = "cpu"
kv_cache_gib = {gib}

[server]
port = {_free_port()}
""")
    r = _run_failing([str(LLM), "serve", str(profile)])
    assert r.returncode != 0 and "serving" not in r.stdout
    assert "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("llm serve: ") and f"max_model_len <= {fits}" in last and "'auto'" in last, last
    assert f"holds {fits} tokens" in last and "max_model_len=2048" in last


def test_missing_model_offline_names_where_it_looked(tmp_path):
    home, hub = tmp_path / "home", tmp_path / "hub"
    env = {"LLM_HOME": str(home), "HF_HUB_CACHE": str(hub), "LLM_OFFLINE": ""}
    # the packaged default model, not fetched into this (empty) LLM_HOME
    r = _run_failing([str(LLM), "serve", "--offline", "--port", str(_free_port())], env)
    assert r.returncode == 1 and "Traceback" not in r.stderr and r.stdout == ""
    assert r.stderr.strip() == (f"llm serve: model {DEFAULT_MODEL} is not in {home / 'models'} and offline mode "
                                f"forbids fetching it (run `llm pull {DEFAULT_MODEL}` on a connected host)")
    # a hub repo id missing from the HF cache
    r = _run_failing([str(LLM), "serve", "--offline", "--model", "acme/no-such-model"], env)
    assert r.returncode == 1 and "Traceback" not in r.stderr and r.stdout == ""
    assert r.stderr.strip() == (f"llm serve: model acme/no-such-model is not in the Hugging Face cache ({hub}) "
                                "and offline mode is on")
