"""The engine core in its own process: a loop over a pipe of plain dataclass messages."""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import traceback
from multiprocessing.connection import Connection

from engine.config import EngineConfig
from engine.messages import AbortRequest, EmbedRequest, EngineRequest, StopSample

log = logging.getLogger("llm.engine")

# Messages from the core: ("phase", str) | ("ready", EngineInfo) | ("fatal", str)
#                         | ("outputs", list[TokenOutput], EngineStats) | ("stats", EngineStats)
#                         | ("embeddings", EmbedOutput)
# Messages to the core:   EngineRequest | AbortRequest | EmbedRequest | "stats" | "shutdown"


def run_engine_core(config: EngineConfig, requests: Connection, outputs: Connection) -> None:
    """Process entry point: build the core, then serve until told to shut down or the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    try:
        from engine.embedding_core import EmbeddingCore, is_encoder_model
        if is_encoder_model(config.model):
            core = EmbeddingCore(config, on_phase=lambda phase: outputs.send(("phase", phase)))
        else:
            from engine.core import EngineCore
            core = EngineCore(config, on_phase=lambda phase: outputs.send(("phase", phase)))
    except Exception as e:  # startup errors are the user's to read: one line, no traceback
        outputs.send(("fatal", f"{type(e).__name__}: {e}" if not str(e) else str(e)))
        return
    outputs.send(("ready", core.info))
    try:
        _serve(core, requests, outputs)
    except (EOFError, BrokenPipeError, OSError):
        pass  # the API process went away: nothing left to serve


def _serve(core, requests: Connection, outputs: Connection) -> None:
    while True:
        if not core.has_work():
            requests.poll(None)  # idle: sleep until a message arrives
        immediate = []
        while requests.poll(0):
            msg = requests.recv()
            if isinstance(msg, EngineRequest):
                immediate.extend(core.add_request(msg))
            elif isinstance(msg, AbortRequest):
                immediate.extend(core.abort(msg.request_ids))
            elif isinstance(msg, StopSample):
                immediate.extend(core.stop_sample(msg.request_id, msg.index))
            elif isinstance(msg, EmbedRequest):
                outputs.send(("embeddings", core.embed(msg)))
            elif msg == "stats":
                outputs.send(("stats", core.stats()))
            elif msg == "shutdown":
                core.abort(list(core.requests))
                outputs.send(("outputs", [], core.stats()))
                return
        step_outputs = []
        if core.has_work():
            try:
                step_outputs = core.step()
            except Exception as e:  # a bug must not hang clients: fail their requests, keep serving
                log.error("engine step failed:\n%s", traceback.format_exc())
                step_outputs = core.fail_all(f"internal engine error: {type(e).__name__}: {e}")
        if immediate or step_outputs:
            outputs.send(("outputs", immediate + step_outputs, core.stats()))


class EngineProcess:
    """Handle on the engine process: start it, send messages, receive messages."""

    def __init__(self, config: EngineConfig):
        ctx = mp.get_context("spawn")
        self._requests_recv, self._requests_send = ctx.Pipe(duplex=False)
        self._outputs_recv, self._outputs_send = ctx.Pipe(duplex=False)
        self.process = ctx.Process(target=run_engine_core, name="llm-engine-core", daemon=True,
                                   args=(config, self._requests_recv, self._outputs_send))

    def start(self) -> None:
        self.process.start()
        # Close our copies of the child's ends so EOF is seen when the child dies.
        self._requests_recv.close()
        self._outputs_send.close()

    def send(self, msg) -> None:
        self._requests_send.send(msg)

    def recv(self, timeout: float | None = None):
        """The next message, or None on timeout; raises EOFError when the process is gone."""
        if timeout is not None and not self._outputs_recv.poll(timeout):
            return None
        return self._outputs_recv.recv()

    def shutdown(self, timeout: float = 10.0) -> None:
        if self.process.is_alive():
            try:
                self.send("shutdown")
            except (BrokenPipeError, OSError):
                pass
            self.process.join(timeout)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(2)
        if self.process.is_alive():
            os.kill(self.process.pid, signal.SIGKILL)
        for conn in (self._requests_send, self._outputs_recv):
            conn.close()
