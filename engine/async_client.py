"""AsyncEngineClient: the EngineClient of our engine process (asyncio streams per request)."""
from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator, Callable

from engine.config import EngineConfig
from engine.engine_process import EngineProcess
from engine.multimodal import ImageInput
from engine.pipe_frames import FrameReader
from engine.messages import (AbortRequests, AddRequest, EmbedOutput, EmbedRequest, EngineFatal, EngineInfo,
                             EngineStats, FromCore, PhaseUpdate, StatsRequest, StepOutputs, StopSample, ToCore,
                             TokenOutput, TranscribeRequest, TranscriptionOutput)
from engine.protocol import EngineClient, EngineDeadError, EngineStartupError
from engine.sampling_params import SamplingParams

__all__ = ["AsyncEngineClient", "EngineDeadError", "EngineStartupError"]

STATS_TIMEOUT_S = 5.0   # a core busy with one long step answers late: /metrics then shows the last figures


class AsyncEngineClient(EngineClient):
    def __init__(self, config: EngineConfig, process: EngineProcess | None = None):
        """process: one already started for this config (the server starts its engines before its own
        imports, so both load at once); None: started by start()."""
        self.config = config
        self._phase = "starting engine process"
        self._info: EngineInfo | None = None
        self._error: str | None = None
        self.latest_stats = EngineStats()            # from the last message that carried stats
        self._process = process or EngineProcess(config)
        self._queues: dict[str, asyncio.Queue[TokenOutput | TranscriptionOutput | EngineDeadError]] = {}
        self._embeds: dict[str, asyncio.Future[EmbedOutput]] = {}
        self._stats_waiters: list[asyncio.Future[EngineStats]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Future[EngineInfo] | None = None
        self._on_phase: Callable[[str], None] | None = None
        self._send_lock = threading.Lock()
        self._frames: FrameReader | None = None   # set while the event loop waits on the engine's pipe

    @property
    def phase(self) -> str:
        return self._phase

    @property
    def info(self) -> EngineInfo | None:
        return self._info

    @property
    def error(self) -> str | None:
        return self._error

    async def start(self, on_phase: Callable[[str], None] | None = None) -> EngineInfo:
        """Start the engine process and wait until it has loaded the model."""
        self._loop = asyncio.get_running_loop()
        self._ready = self._loop.create_future()
        self._on_phase = on_phase
        self._process.start()
        # NOTE: the loop itself waits on the pipe (no reader thread): an output reaches its stream with no
        # hop between threads, no GIL handoff and one wake-up fewer a step, on cores the engine needs.
        fd = self._process.outputs_fileno()
        os.set_blocking(fd, False)
        self._frames = FrameReader(fd)
        self._loop.add_reader(fd, self._on_readable)
        return await self._ready

    def _on_readable(self) -> None:
        try:
            messages = self._frames.read()
        except (EOFError, OSError):
            self._stop_reading()
            self._on_dead()
            return
        for msg in messages:
            self._dispatch(msg)

    def _stop_reading(self) -> None:
        if self._frames is not None:
            self._loop.remove_reader(self._frames.fd)
            self._frames = None

    def _dispatch(self, msg: FromCore) -> None:
        match msg:
            case StepOutputs():
                for out in msg.outputs:
                    queue = self._queues.get(out.request_id)
                    if queue is not None:
                        queue.put_nowait(out)
                self.latest_stats = msg.stats
            case EngineStats():   # the answer to the oldest StatsRequest (the core answers them in order)
                self.latest_stats = msg
                if self._stats_waiters:
                    future = self._stats_waiters.pop(0)
                    if not future.done():
                        future.set_result(msg)
            case EmbedOutput():
                future = self._embeds.pop(msg.request_id, None)
                if future is not None and not future.done():
                    future.set_result(msg)
            case PhaseUpdate():
                self._phase = msg.phase
                if self._on_phase:
                    self._on_phase(msg.phase)
            case EngineInfo():
                self._info = msg
                self._phase = "ready"
                if not self._ready.done():
                    self._ready.set_result(msg)
            case EngineFatal():
                self._error = msg.message
                self._phase = "failed"
                if not self._ready.done():
                    self._ready.set_exception(EngineStartupError(msg.message))
            case _:
                raise TypeError(f"not a message from the engine core: {type(msg).__name__}")

    def _on_dead(self) -> None:
        if self._error is None:
            code = self._process.exit_code
            self._error = "the engine process exited unexpectedly" + (f" (exit code {code})" if code else "")
        self._phase = "failed"
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(EngineStartupError(self._error))
        for queue in self._queues.values():
            queue.put_nowait(EngineDeadError(self._error))
        for future in [*self._embeds.values(), *self._stats_waiters]:
            if not future.done():
                future.set_exception(EngineDeadError(self._error))
        self._embeds.clear()
        self._stats_waiters.clear()

    def _send(self, msg: ToCore) -> None:
        if self._error is not None:
            raise EngineDeadError(self._error)
        with self._send_lock:
            self._process.send(msg)

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *,
                       images: tuple[ImageInput, ...] = ()) -> AsyncIterator[TokenOutput]:
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already in flight")
        queue: asyncio.Queue[TokenOutput | EngineDeadError] = asyncio.Queue()
        self._queues[request_id] = queue
        remaining = params.n
        try:
            self._send(AddRequest(request_id, list(prompt_token_ids), params, time.monotonic(), tuple(images)))
            while remaining:
                out = await queue.get()
                if isinstance(out, EngineDeadError):
                    raise out
                if out.finished:
                    remaining -= 1
                yield out
        finally:
            del self._queues[request_id]
            if remaining and self._error is None:
                self.abort(request_id)

    async def transcribe(self, request: TranscribeRequest) -> AsyncIterator[TranscriptionOutput]:
        if request.request_id in self._queues:
            raise ValueError(f"request id {request.request_id!r} is already in flight")
        queue: asyncio.Queue[TranscriptionOutput | EngineDeadError] = asyncio.Queue()
        self._queues[request.request_id] = queue
        finished = False
        try:
            self._send(request)
            while not finished:
                out = await queue.get()
                if isinstance(out, EngineDeadError):
                    raise out
                finished = out.finished
                yield out
        finally:
            del self._queues[request.request_id]
            if not finished and self._error is None:
                self.abort(request.request_id)

    async def embed(self, request_id: str, inputs: list[list[int]], pooling: str | None = None,
                    normalize: bool = True, *, task: str = "embed",
                    token_type_ids: list[list[int]] | None = None) -> EmbedOutput:
        future = asyncio.get_running_loop().create_future()
        self._embeds[request_id] = future
        try:
            self._send(EmbedRequest(request_id, inputs, pooling, normalize, task, token_type_ids))
            return await future
        finally:
            self._embeds.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        try:
            self._send(AbortRequests([request_id]))
        except (EngineDeadError, BrokenPipeError, OSError):
            pass

    def stop_sample(self, request_id: str, index: int) -> None:
        try:
            self._send(StopSample(request_id, index))
        except (EngineDeadError, BrokenPipeError, OSError):
            pass

    async def stats(self) -> EngineStats:
        """Fresh figures from the core; before it is ready, or when it is gone, the last ones known."""
        if not self.is_ready:
            return self.latest_stats
        try:
            self._send(StatsRequest())
        except (EngineDeadError, BrokenPipeError, OSError):
            return self.latest_stats
        future = asyncio.get_running_loop().create_future()
        self._stats_waiters.append(future)   # one per request sent: replies pair up in order
        try:
            return await asyncio.wait_for(asyncio.shield(future), STATS_TIMEOUT_S)
        except (asyncio.TimeoutError, EngineDeadError):
            return self.latest_stats

    async def shutdown(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._process.stop)
        self._stop_reading()   # before the pipe closes: the loop must not wait on a closed descriptor
        self._process.close()
