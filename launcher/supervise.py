"""Spawn the server process for a profile, show its startup, forward signals, shut down cleanly."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from launcher.profile import Profile, ProfileError
from launcher.server.settings import LaunchSpec, write_launch_spec

_POLL_S = 0.25
_READY_POLL_S = 0.05   # readiness polls of a local port are cheap: the ready line comes as soon as it is true
_STOP_GRACE_S = 15.0
SERVER_FLAG = "--llm-server"   # the packaged executable (launcher/frozen.py) runs the server when given this


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def prepare_launch(profile: Profile) -> LaunchSpec | None:
    """The LaunchSpec for `profile` (models resolved, port 0 replaced by a free one), its upstreams shown;
    None after printing why it cannot be served."""
    from engine.weights import WeightsError, resolve_model
    from launcher.launch import build_launch, startup_lines
    try:
        spec = build_launch(profile, resolve_model)
    except (ProfileError, WeightsError, OSError, ValueError) as e:
        print(f"llm serve: {e}", file=sys.stderr)
        return None
    if not spec.models and not spec.upstreams:
        print("llm serve: nothing to serve: [model] enabled = false, and no [[models]] or [[upstreams]]",
              file=sys.stderr)
        return None
    for line in startup_lines(spec):
        print(line, file=sys.stderr, flush=True)
    if spec.settings.port == 0:
        spec = dataclasses.replace(spec, settings=dataclasses.replace(spec.settings,
                                                                      port=free_port(spec.settings.host)))
    return spec


def local_host(host: str) -> str:
    """The address this machine reaches a server bound to `host` at."""
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def local_url(host: str, port: int) -> str:
    """Where this machine reaches a server bound to host:port."""
    host = local_host(host)
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


def http_get(host: str, port: int, path: str, timeout: float) -> tuple[int, bytes]:
    """(status, body) of GET http://host:port/path over a plain socket. NOTE: not urllib: this process only
    waits for the server, and urllib's import (ssl, email, http.client) would add ~8 MB to its resident memory
    for all of the server's life. Raises OSError (no connection) or ValueError (not an HTTP response)."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode("ascii"))
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head, sep, body = b"".join(chunks).partition(b"\r\n\r\n")
    status_line, *headers = head.split(b"\r\n")
    parts = status_line.split(b" ", 2)
    if not sep or len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
        raise ValueError("not an HTTP response")
    for header in headers:
        name, _, value = header.partition(b":")
        if name.strip().lower() == b"content-length":
            body = body[:int(value)]
    return int(parts[1]), body


def serve(profile: Profile) -> int:
    """Run the server for `profile` until it stops or we are signalled; returns the exit status."""
    spec = prepare_launch(profile)
    if spec is None:
        return 1
    with tempfile.TemporaryDirectory(prefix="llm-serve-") as tmp:
        status_file = str(Path(tmp) / "status")
        spec = dataclasses.replace(spec, settings=dataclasses.replace(spec.settings, status_file=status_file))
        spec_file = Path(tmp) / "spec.pickle"
        write_launch_spec(spec, spec_file)
        return _supervise(spec, spec_file, Path(status_file))


def server_command(spec_file: Path) -> list[str]:
    """How to start the server process: `python -m launcher.server`, or the packaged executable itself."""
    if getattr(sys, "frozen", False):
        return [sys.executable, SERVER_FLAG, str(spec_file)]
    return [sys.executable, "-m", "launcher.server", str(spec_file)]


def _supervise(spec: LaunchSpec, spec_file: Path, status_file: Path) -> int:
    started = time.monotonic()
    settings = spec.settings
    # NOTE: the server gets its own session so a terminal's Ctrl-C reaches only us; we forward it once.
    child = subprocess.Popen(server_command(spec_file), start_new_session=True, preexec_fn=_die_with_parent)
    stopping = {"signal": None}

    def forward(signum, _frame) -> None:
        if stopping["signal"] is None:
            stopping["signal"] = signum
            _signal_group(child.pid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        url = local_url(settings.host, settings.port)
        ready = _wait_ready(child, local_host(settings.host), settings.port, stopping)
        if ready is not None:
            print(ready_line(spec, ready, url, time.monotonic() - started), flush=True)
        code = _wait_exit(child, stopping)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _signal_group(child.pid, signal.SIGKILL)   # nothing of the server's may outlive it
    if stopping["signal"] is not None and code in (0, -signal.SIGTERM):
        print("llm: server stopped", file=sys.stderr)
        return 0
    if code != 0:
        reason = status_file.read_text(encoding="utf-8").strip() if status_file.exists() else ""
        print(f"llm serve: the server exited with status {code}" + (f": {reason}" if reason else ""),
              file=sys.stderr)
        return code if code > 0 else 1
    return 0


def ready_line(spec: LaunchSpec, ready: dict, url: str, seconds: float) -> str:
    """The one line printed once the server is ready: what it serves, where, on what, how fast it started."""
    if not spec.models:
        upstreams = ", ".join(u.name for u in spec.upstreams)
        return f"llm: serving the models of {upstreams} at {url}/v1 | ready in {seconds:.1f}s"
    names = list(spec.models[0].served_model_names)
    alias = f" (aliases: {', '.join(names[1:])})" if len(names) > 1 else ""
    more = [m.primary_name for m in spec.models[1:]] + [f"{u.name} (upstream)" for u in spec.upstreams]
    also = f" (also: {', '.join(more)})" if more else ""
    return (f"llm: serving {names[0]}{alias}{also} at {url}/v1 | device {ready.get('device')} | KV cache "
            f"{ready.get('kv_capacity_tokens')} tokens | max_model_len {ready.get('max_model_len')} | "
            f"ready in {seconds:.1f}s")


def _wait_ready(child: subprocess.Popen, host: str, port: int, stopping: dict) -> dict | None:
    """Poll readiness, printing each startup phase once; the ready body, or None if the server ended first."""
    last_phase = None
    while child.poll() is None and stopping["signal"] is None:
        try:
            status, body = http_get(host, port, "/health/ready", timeout=2)
            answer = json.loads(body)
        except (OSError, ValueError):
            answer = None   # the port is not up yet
        if answer is not None and status == 200:
            return answer
        phase = answer.get("phase") if isinstance(answer, dict) else None
        if phase and phase != last_phase:
            print(f"llm: {phase} ...", file=sys.stderr, flush=True)
            last_phase = phase
        time.sleep(_READY_POLL_S)
    return None


def _wait_exit(child: subprocess.Popen, stopping: dict) -> int:
    deadline = None
    while True:
        try:
            return child.wait(timeout=_POLL_S)
        except subprocess.TimeoutExpired:
            pass
        if stopping["signal"] is not None:
            deadline = deadline or time.monotonic() + _STOP_GRACE_S
            if time.monotonic() > deadline:
                _signal_group(child.pid, signal.SIGKILL)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the supervisor itself dies (Linux), so no server is orphaned."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    """`python -m launcher.supervise [PROFILE.toml]`: serve a profile file (or the built-in default)."""
    from launcher.profile import default_profile, load_profile
    argv = sys.argv[1:] if argv is None else argv
    try:
        profile = load_profile(argv[0]) if argv else default_profile()
    except ProfileError as e:
        print(f"llm serve: {e}", file=sys.stderr)
        return 2
    return serve(profile)


if __name__ == "__main__":
    sys.exit(main())
