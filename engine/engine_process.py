"""The parent's handle on the engine process (engine/core_process.py is the child's side): spawn it, send it
messages, read what it sends back.

Kept apart from the child's loop so that starting an engine imports little: the server spawns its engines
first thing, and every module imported before the spawn delays the engine's own (much longer) torch import.
"""
from __future__ import annotations

import os
import subprocess
import sys
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING

from engine.config import EngineConfig

if TYPE_CHECKING:
    from engine.messages import ToCore

ENGINE_FLAG = "--llm-engine-core"   # the packaged executable (launcher/frozen.py) runs the core when given this


def engine_command(requests_fd: int, outputs_fd: int) -> list[str]:
    if getattr(sys, "frozen", False):   # the packaged build: the executable itself, see launcher/frozen.py
        return [sys.executable, ENGINE_FLAG, str(requests_fd), str(outputs_fd)]
    return [sys.executable, "-m", "engine.core_process", str(requests_fd), str(outputs_fd)]


class EngineProcess:
    """Handle on the engine process: start it, send messages, receive messages."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.process: subprocess.Popen | None = None
        self._requests: Connection | None = None
        self._outputs: Connection | None = None

    def start(self) -> None:
        """Spawn the engine process and send it its config (once: a second call does nothing)."""
        if self.process is not None:
            return
        child_requests, requests = os.pipe()
        outputs, child_outputs = os.pipe()
        env = dict(os.environ)
        # The child imports `engine` from where this process found it, whatever its working directory.
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        try:
            self.process = subprocess.Popen(engine_command(child_requests, child_outputs), env=env,
                                            pass_fds=(child_requests, child_outputs), stdin=subprocess.DEVNULL)
        finally:
            # Our copies of the child's ends close, so EOF is seen on either side when the other dies.
            os.close(child_requests)
            os.close(child_outputs)
        self._requests = Connection(requests, readable=False)
        self._outputs = Connection(outputs, writable=False)
        self.send(self.config)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def exit_code(self) -> int | None:
        return self.process.poll() if self.process is not None else None

    def send(self, msg: ToCore | EngineConfig) -> None:
        self._requests.send(msg)

    def recv(self, timeout: float | None = None):
        """The next message (a FromCore), or None on timeout; raises EOFError when the process is gone."""
        if timeout is not None and not self._outputs.poll(timeout):
            return None
        return self._outputs.recv()

    def outputs_fileno(self) -> int:
        """The read end of the engine's output pipe (the async client waits on it in its event loop)."""
        return self._outputs.fileno()

    def shutdown(self, timeout: float = 10.0) -> None:
        self.stop(timeout)
        self.close()

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the process to shut down and wait for it (past timeout: terminate, then kill); the pipes stay
        open, so what it sends on its way out can still be read."""
        if self.process is None or self.process.poll() is not None:
            return
        from engine.messages import Shutdown
        try:
            self.send(Shutdown())
        except (BrokenPipeError, OSError):
            pass
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.terminate()
            try:
                self.process.wait(2)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def close(self) -> None:
        """Close the pipes (after stop)."""
        if self.process is None:
            return
        for conn in (self._requests, self._outputs):
            conn.close()
        self.process = None
