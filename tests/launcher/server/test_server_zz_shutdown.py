"""Runs last: SIGINT to the supervisor stops the server and the engine with no process left behind."""
from __future__ import annotations

import os
import time


def test_sigint_stops_everything(server):
    pids = server.descendants()
    assert len(pids) >= 2, pids   # the server process and the engine process under it
    code = server.stop()
    assert code == 0, server.log_path.read_text()[-3000:]
    deadline = time.monotonic() + 10
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in pids if _alive(p)]
        time.sleep(0.1)
    assert not alive, f"orphaned processes: {alive}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead, just not yet reaped by its (gone) parent
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
