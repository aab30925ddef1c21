"""The packaged build (scripts/build_executable) on a clean home: no Python, no network, no model cache.

Runs only when LLM_PACKAGED names the built executable: building takes minutes, so CI tests the source
tree and scripts/build_executable runs this file against what it built."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.launcher.test_serve_cli import READY, _free_port, _processes, _pump, descendants

EXE = os.environ.get("LLM_PACKAGED")
pytestmark = pytest.mark.skipif(not EXE, reason="set LLM_PACKAGED to dist/llm/llm (scripts/build_executable does)")
STARTUP_TIMEOUT_S = 180


@pytest.fixture
def clean_env(tmp_path: Path) -> dict[str, str]:
    """A fresh LLM_HOME and HF cache, and no venv on PATH: only what the folder carries."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LLM_", "HF_", "VIRTUAL_ENV", "PYTHON"))}
    env.update(LLM_HOME=str(tmp_path / "home"), HF_HOME=str(tmp_path / "hf"), PYTHONUNBUFFERED="1",
               PATH="/usr/bin:/bin")   # the system C compiler stays reachable, a venv's python does not
    return env


def test_cli_answers(clean_env):
    out = subprocess.run([EXE, "--help"], capture_output=True, text=True, env=clean_env, timeout=120)
    assert out.returncode == 0 and "serve" in out.stdout, out.stderr
    out = subprocess.run([EXE, "list", "--json"], capture_output=True, text=True, env=clean_env, timeout=120)
    assert out.returncode == 0, out.stderr
    listing = json.loads(out.stdout)
    assert "default" in {p["name"] for p in listing["profiles"]}
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in {m["name"] for m in listing["models"]}   # the bundled one


def test_is_offline_by_default(clean_env):
    out = subprocess.run([EXE, "serve", "--model", "some-org/not-here", "--port", str(_free_port())],
                         capture_output=True, text=True, env=clean_env, timeout=STARTUP_TIMEOUT_S)
    assert out.returncode != 0 and "offline" in (out.stdout + out.stderr).lower()


def test_serves_the_bundled_model(clean_env):
    port = _free_port()
    proc = subprocess.Popen([EXE, "serve", "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=clean_env, start_new_session=True)
    lines: list[str] = []
    errors: list[str] = []
    for stream, sink in ((proc.stdout, lines), (proc.stderr, errors)):
        threading.Thread(target=_pump, args=(stream, sink), daemon=True).start()
    started = time.monotonic()
    try:
        while not lines:
            assert proc.poll() is None, f"llm serve exited {proc.returncode}:\n" + "\n".join(errors)
            assert time.monotonic() - started < STARTUP_TIMEOUT_S, "no ready line:\n" + "\n".join(errors)
            time.sleep(0.2)
        ready = READY.match(lines[0])
        assert ready and ready["name"] == "HuggingFaceTB/SmolLM2-135M-Instruct", lines[0]
        body = json.dumps({"model": ready["name"], "max_tokens": 8, "temperature": 0,
                           "messages": [{"role": "user", "content": "What is the capital of France?"}]})
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body.encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            reply = json.loads(response.read())
        assert reply["choices"][0]["message"]["content"].strip()
        assert reply["usage"]["completion_tokens"] == 8
        assert list(Path(clean_env["LLM_HOME"], "kernels").glob("cpu_kernels-*.so")), "C kernels not built"
        children = descendants(proc.pid)
        assert len(children) >= 2, children     # the server process and the engine process
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    assert code == 0, "\n".join(errors)
    deadline = time.monotonic() + 10
    while _running(EXE) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _running(EXE), "processes left behind after SIGINT"


def _running(exe: str) -> list[str]:
    return [cmd for _, cmd in _processes().values() if cmd.startswith(exe)]
