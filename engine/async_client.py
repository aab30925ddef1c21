"""AsyncEngineClient: the API process's view of the engine process (asyncio streams per request)."""
from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable

from engine.config import EngineConfig
from engine.core_process import EngineProcess
from engine.messages import (AbortRequest, EmbedOutput, EmbedRequest, EngineInfo, EngineRequest, EngineStats,
                             StopSample, TokenOutput)
from engine.sampling_params import SamplingParams


class EngineDeadError(RuntimeError):
    """The engine process is gone; every waiting request gets this error."""


class EngineStartupError(RuntimeError):
    """The engine process could not start; the message is its one-line reason."""


class AsyncEngineClient:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.phase = "starting engine process"
        self.info: EngineInfo | None = None
        self.stats = EngineStats()
        self.error: str | None = None
        self._process = EngineProcess(config)
        self._queues: dict[str, asyncio.Queue] = {}
        self._embeds: dict[str, asyncio.Future] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Future | None = None
        self._send_lock = threading.Lock()
        self._reader: threading.Thread | None = None

    @property
    def is_ready(self) -> bool:
        return self.info is not None and self.error is None

    async def start(self, on_phase: Callable[[str], None] | None = None) -> EngineInfo:
        """Spawn the engine process and wait until it has loaded the model."""
        self._loop = asyncio.get_running_loop()
        self._ready = self._loop.create_future()
        self._on_phase = on_phase
        self._process.start()
        self._reader = threading.Thread(target=self._read_loop, name="llm-engine-reader", daemon=True)
        self._reader.start()
        return await self._ready

    def _read_loop(self) -> None:
        while True:
            try:
                msg = self._process.recv()
            except (EOFError, OSError):
                self._notify(self._on_dead)
                return
            if not self._notify(self._dispatch, msg):
                return

    def _notify(self, callback, *args) -> bool:
        """Hand work to the event loop; False once the loop has closed (the server is shutting down and
        the engine process's pipe closing with it is expected, not news for anyone)."""
        try:
            self._loop.call_soon_threadsafe(callback, *args)
            return True
        except RuntimeError:
            return False

    def _dispatch(self, msg) -> None:
        kind = msg[0]
        if kind == "outputs":
            for out in msg[1]:
                queue = self._queues.get(out.request_id)
                if queue is not None:
                    queue.put_nowait(out)
            self.stats = msg[2]
        elif kind == "stats":
            self.stats = msg[1]
        elif kind == "embeddings":
            future = self._embeds.pop(msg[1].request_id, None)
            if future is not None and not future.done():
                future.set_result(msg[1])
        elif kind == "phase":
            self.phase = msg[1]
            if self._on_phase:
                self._on_phase(msg[1])
        elif kind == "ready":
            self.info = msg[1]
            self.phase = "ready"
            if not self._ready.done():
                self._ready.set_result(msg[1])
        elif kind == "fatal":
            self.error = msg[1]
            self.phase = "failed"
            if not self._ready.done():
                self._ready.set_exception(EngineStartupError(msg[1]))

    def _on_dead(self) -> None:
        if self.error is None:
            self.error = "the engine process exited unexpectedly"
        self.phase = "failed"
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(EngineStartupError(self.error))
        for rid, queue in self._queues.items():
            queue.put_nowait(TokenOutput(rid, -1, [], finish_reason="error", error=self.error))
        for future in self._embeds.values():
            if not future.done():
                future.set_exception(EngineDeadError(self.error))
        self._embeds.clear()

    def _send(self, msg) -> None:
        if self.error is not None:
            raise EngineDeadError(self.error)
        with self._send_lock:
            self._process.send(msg)

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[TokenOutput]:
        """Stream a request's outputs (all n samples interleaved) until every sample finishes.

        Leaving the iteration early (client gone, error) aborts the request in the engine.
        """
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already in flight")
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        remaining = params.n
        try:
            self._send(EngineRequest(request_id, list(prompt_token_ids), params, time.monotonic()))
            while remaining:
                out: TokenOutput = await queue.get()
                if out.index == -1:  # engine died
                    raise EngineDeadError(out.error or "engine died")
                if out.finished:
                    remaining -= 1
                yield out
        finally:
            del self._queues[request_id]
            if remaining and self.error is None:
                self.abort(request_id)

    async def embed(self, request_id: str, inputs: list[list[int]], pooling: str | None = None,
                    normalize: bool = True) -> EmbedOutput:
        """Embed token id lists; the output carries a numpy [N, D] array or an error message."""
        future = asyncio.get_running_loop().create_future()
        self._embeds[request_id] = future
        try:
            self._send(EmbedRequest(request_id, inputs, pooling, normalize))
            return await future
        finally:
            self._embeds.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        try:
            self._send(AbortRequest([request_id]))
        except (EngineDeadError, BrokenPipeError, OSError):
            pass

    def stop_sample(self, request_id: str, index: int) -> None:
        """End one sample of a running request (a stop string ended its text); its stream still gets
        that sample's final output."""
        try:
            self._send(StopSample(request_id, index))
        except (EngineDeadError, BrokenPipeError, OSError):
            pass

    async def refresh_stats(self, timeout: float = 2.0) -> EngineStats:
        before = self.stats
        self._send("stats")
        deadline = time.monotonic() + timeout
        while self.stats is before and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        return self.stats

    async def shutdown(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._process.shutdown)
