"""The engine loop hands freed heap back to the OS once it has been idle a while after work, never between
a request's steps or while requests keep arriving."""
from __future__ import annotations

import threading
import time
from multiprocessing import Pipe

from engine import core_process
from engine.messages import AddRequest, Shutdown, StepOutputs
from engine.sampling_params import SamplingParams


class _StepsCore:
    """Three steps of work per request; nothing else."""

    def __init__(self) -> None:
        self.requests: dict[str, int] = {}
        self.steps = 0

    def add_request(self, msg: AddRequest) -> list:
        self.requests[msg.request_id] = 3
        return []

    def has_work(self) -> bool:
        return any(self.requests.values())

    def step(self) -> list:
        self.steps += 1
        for rid, left in self.requests.items():
            if left:
                self.requests[rid] = left - 1
        return []

    def abort(self, request_ids: list[str]) -> list:
        return []

    def stats(self):
        return None


def _wait_for(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_freed_memory_is_released_after_an_idle_pause_only(monkeypatch) -> None:
    trims: list[int] = []
    core = _StepsCore()
    monkeypatch.setattr(core_process, "IDLE_TRIM_S", 0.2)
    monkeypatch.setattr(core_process, "_release_freed_memory", lambda: trims.append(core.steps))
    to_core, requests = Pipe()
    outputs, from_core = Pipe()
    loop = threading.Thread(target=core_process._serve, args=(core, requests, outputs), daemon=True)
    loop.start()
    time.sleep(0.4)
    assert trims == []                      # idle from the start: nothing was freed, nothing to trim
    to_core.send(AddRequest("a", [1, 2], SamplingParams(max_tokens=3), time.monotonic()))
    _wait_for(lambda: trims)
    # one trim, after all three steps (they run back to back: the loop only waits when it has no work)
    assert trims == [3]
    time.sleep(0.6)
    assert trims == [3]                     # and not again until more work
    to_core.send(Shutdown())
    loop.join(5)
    assert not loop.is_alive()
    assert isinstance(from_core.recv(), StepOutputs)


def test_release_freed_memory_is_safe_to_call() -> None:
    core_process._release_freed_memory()    # glibc's malloc_trim here; a no-op elsewhere
