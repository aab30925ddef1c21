"""EngineClient: the few methods every model backend offers the server (vLLM's engine/protocol.py idea).

The server's handlers know only this interface; they reach a backend by served model name through one
registry (launcher/server/registry.py). AsyncEngineClient (our engine in its own process) is the first
implementation; any other backend — another local engine, one loaded on demand — is another.
"""
from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Callable

from engine.messages import EmbedOutput, EngineInfo, EngineStats, TokenOutput, TranscribeRequest, TranscriptionOutput
from engine.multimodal import ImageInput
from engine.sampling_params import SamplingParams


class EngineDeadError(RuntimeError):
    """The engine is gone; every waiting request gets this error."""


class EngineStartupError(RuntimeError):
    """The engine could not start; the message is its one-line reason."""


class EngineClient(abc.ABC):
    @property
    @abc.abstractmethod
    def phase(self) -> str:
        """What it is doing: a startup phase ('loading weights', ...), 'ready' or 'failed'."""

    @property
    @abc.abstractmethod
    def info(self) -> EngineInfo | None:
        """What the engine reported when it became ready; None before."""

    @property
    @abc.abstractmethod
    def error(self) -> str | None:
        """Why it failed or died; None while it is fine."""

    @property
    def is_ready(self) -> bool:
        return self.info is not None and self.error is None

    @abc.abstractmethod
    async def start(self, on_phase: Callable[[str], None] | None = None) -> EngineInfo:
        """Start the engine and wait until it can serve; raises EngineStartupError."""

    @abc.abstractmethod
    async def shutdown(self) -> None:
        """Stop the engine; requests still running get an 'abort' output."""

    @abc.abstractmethod
    def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *,
                 images: tuple[ImageInput, ...] = ()) -> AsyncIterator[TokenOutput]:
        """Stream a request's outputs (all n samples interleaved) until every sample finishes (images: a
        vision model's, engine.multimodal). Leaving the
        iteration early aborts the request; a dead engine raises EngineDeadError."""

    @abc.abstractmethod
    def abort(self, request_id: str) -> None:
        """Finish a running request now and free its blocks (a no-op when it is unknown or done)."""

    @abc.abstractmethod
    def stop_sample(self, request_id: str, index: int) -> None:
        """End one sample of a running request (a stop string ended its text); its stream still gets that
        sample's final output."""

    @abc.abstractmethod
    async def embed(self, request_id: str, inputs: list[list[int]], pooling: str | None = None,
                    normalize: bool = True, *, task: str = "embed",
                    token_type_ids: list[list[int]] | None = None) -> EmbedOutput:
        """Run a pooling task over token id lists (engine.messages.EmbedRequest); the output carries the
        task's numpy result or an error message."""

    def transcribe(self, request: TranscribeRequest) -> AsyncIterator[TranscriptionOutput]:
        """Stream a speech model's progress on one clip until an output says finished. Leaving the iteration
        early aborts it; a dead engine raises EngineDeadError. Backends without speech models keep this."""
        raise NotImplementedError(f"{type(self).__name__} serves no speech model")

    @abc.abstractmethod
    async def stats(self) -> EngineStats:
        """Current figures (queues, KV cache, counters) for /metrics."""
