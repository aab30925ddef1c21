"""One real server (supervisor -> server -> engine processes) with the default model, shared by the server tests."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PRIMARY = "HuggingFaceTB/SmolLM2-135M-Instruct"
ALIAS = "smol"
API_KEY = "test-key-123"
ALLOWED_ORIGIN = "http://allowed.example"
MAX_MODEL_LEN = 2048
MAX_BODY = 256 * 1024
REPO = Path(__file__).resolve().parents[3]
STARTUP_TIMEOUT_S = 240


@dataclass
class Server:
    url: str
    api_key: str
    proc: subprocess.Popen
    model_path: str
    ready_phases: list[tuple[int, str]] = field(default_factory=list)   # distinct (status, phase) seen
    stdout_lines: list[str] = field(default_factory=list)
    log_path: Path | None = None

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def descendants(self) -> list[int]:
        """pids of every process under the supervisor (server, engine), read from /proc."""
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                children.setdefault(ppid, []).append(int(entry.name))
        found, todo = [], [self.proc.pid]
        while todo:
            for child in children.get(todo.pop(), []):
                found.append(child)
                todo.append(child)
        return found

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _read_lines(stream, sink: list[str]) -> None:
    for line in stream:
        sink.append(line.rstrip("\n"))


def start_server(profile_body: str, tmp: Path, api_key: str | None = API_KEY, model_path: str = "",
                 server_extra: str = "", port: int | None = None, env: dict[str, str] | None = None) -> Server:
    """Start `llm serve` (the supervisor) on a free port (or `port`) with a profile; wait until it is ready.
    api_key None: the server checks no keys."""
    port = port or _free_port()
    profile = tmp / "test.toml"
    keys = f'api_keys = ["{api_key}"]' if api_key is not None else ""
    profile.write_text(profile_body + f"""
[server]
host = "127.0.0.1"
port = {port}
{keys}
cors_origins = ["{ALLOWED_ORIGIN}"]
max_request_body_bytes = {MAX_BODY}
{server_extra}
""")
    return launch([sys.executable, "-m", "launcher.supervise", str(profile)], tmp, port, api_key, model_path, env)


def start_cli_server(args: list[str], tmp: Path, api_key: str | None = None, model_path: str = "",
                     port: int | None = None, env: dict[str, str] | None = None) -> Server:
    """`llm serve ARGS --port P` as a user types it (flags, no profile file); wait until it is ready."""
    port = port or _free_port()
    return launch([sys.executable, "-m", "launcher.cli", "serve", *args, "--port", str(port)], tmp, port, api_key,
                  model_path, env)


def launch(cmd: list[str], tmp: Path, port: int, api_key: str | None, model_path: str,
           env: dict[str, str] | None) -> Server:
    log_path = tmp / f"server-{port}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    srv = Server(f"http://127.0.0.1:{port}", api_key or "", proc, model_path, log_path=log_path)
    threading.Thread(target=_read_lines, args=(proc.stdout, srv.stdout_lines), daemon=True).start()
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    try:
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not become ready (exit {proc.poll()}):\n{log_path.read_text()}")
            try:
                with urllib.request.urlopen(srv.url + "/health/ready", timeout=5) as response:
                    _note(srv, response.status, json.loads(response.read())["phase"])
                    break
            except urllib.error.HTTPError as e:
                _note(srv, e.code, json.loads(e.read()).get("phase", ""))
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        for _ in range(100):  # the supervisor prints its ready line right after it sees readiness
            if srv.stdout_lines:
                break
            time.sleep(0.05)
    except BaseException:
        srv.stop()
        raise
    return srv


@pytest.fixture(scope="session")
def server(default_gguf_path: str, tmp_path_factory: pytest.TempPathFactory) -> Server:
    srv = start_server(f"""
[model]
source = "{default_gguf_path}"
served_names = ["{PRIMARY}", "{ALIAS}"]
max_model_len = {MAX_MODEL_LEN}

[engine]
device = "cpu"
kv_cache_gib = 0.5
max_num_seqs = 256

# The exact path (float32 activations): these tests hold its logprobs to transformers' (test_server_echo.py)
# and its greedy answers to what they are; the int8 default is served over HTTP by test_serve_cli.py,
# test_many_models.py and the other servers started from their own profiles.
[kernels]
cpu_quantized_activations = false
""", tmp_path_factory.mktemp("server"), model_path=default_gguf_path)
    try:
        yield srv
    finally:
        srv.stop()


MINILM = "sentence-transformers/all-MiniLM-L6-v2"


@pytest.fixture(scope="session")
def embed_server(minilm_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Server:
    """all-MiniLM-L6-v2 served as MINILM (alias "minilm"): shared by the embeddings and pooling tests."""
    srv = start_server(f"""
[model]
source = "{minilm_dir}"
served_names = ["{MINILM}", "minilm"]

[engine]
device = "cpu"
""", tmp_path_factory.mktemp("embed"), model_path=minilm_dir)
    try:
        yield srv
    finally:
        srv.stop()


def _note(srv: Server, status: int, phase: str) -> None:
    if not srv.ready_phases or srv.ready_phases[-1] != (status, phase):
        srv.ready_phases.append((status, phase))


@pytest.fixture(scope="session")
def client(server: Server):
    import openai
    with openai.OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="session")
def hf_tokenizer(default_gguf_path: str):
    """The reference tokenizer: transformers reading the same GGUF."""
    from transformers import AutoTokenizer
    path = Path(default_gguf_path)
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
