"""What the benchmark scripts share: a free loopback port, `llm serve` of a profile started and waited on, a
server's ready wait, its process tree's resident memory, and one `llm bench serve` run read back as JSON."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, log: Path, path: str = "/health/ready",
               timeout_s: float = 300) -> None:
    """Until GET url+path answers 200; a server that exits or stays unready past timeout_s is an error."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url + path, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.02)   # startup is compared to ~0.4 s: a coarser poll would round both servers up by as much
    proc.kill()
    raise RuntimeError(f"{url} did not become ready in {timeout_s:g} s: {log.read_text()[-2000:]}")


def start_llm(profile: str, folder: Path) -> tuple[subprocess.Popen, str]:
    """`llm serve` of a profile's text (the [server] table is added here) on a free port, once ready."""
    port = free_port()
    path = folder / f"p{port}.toml"
    path.write_text(profile + f'\n[server]\nhost = "127.0.0.1"\nport = {port}\n')
    log = folder / f"log{port}.txt"
    proc = subprocess.Popen([sys.executable, "-m", "launcher.supervise", str(path)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc, log)
    return proc, url


def stop(proc: subprocess.Popen, timeout_s: float = 60) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def bench_serve(url: str, out: Path, *args: str) -> dict:
    """One `llm bench serve --url URL ARGS...` (quiet), its --result-json read back."""
    cmd = [sys.executable, "-m", "launcher.cli", "bench", "serve", "--url", url, *args, "--result-json", str(out),
           "--quiet"]
    subprocess.run(cmd, cwd=ROOT, check=True)
    return json.loads(out.read_text())
