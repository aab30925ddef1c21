"""GET /v1/realtime: vLLM's realtime transcription protocol over a WebSocket, one connection per session.

Client events: session.update (model, language, prompt, temperature, input_audio_format "pcm16",
input_audio_sample_rate), input_audio_buffer.append (base64 PCM16 mono), input_audio_buffer.commit (transcribe
what was appended since the last commit; an empty buffer is a no-op, so vLLM's clients' opening commit and
`final: true` both work), input_audio_buffer.clear. Server events: session.created, session.updated,
transcription.delta, transcription.done, input_audio_buffer.cleared, and error — after which the socket stays
open. Commits are transcribed one after another, in order; closing the socket aborts the one in flight."""
from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from sanic.exceptions import WebsocketClosed
from sanic.request import Request
from sanic.server.websockets.impl import WebsocketImplProtocol
from websockets.exceptions import ConnectionClosed

from engine.audio import AudioError, pcm16_to_float, resample
from launcher.server.errors import APIError
from launcher.server.serving_audio import find_speech_model, require_speech
from launcher.server.state import ServerState
from launcher.server.transcription import (Transcription, check_language, check_length, new_request,
                                           prompt_token_ids)

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger("llm.server")

# vLLM's realtime clients send 16 kHz PCM16 (OpenAI's pcm16 is 24 kHz: such clients set input_audio_sample_rate).
DEFAULT_SAMPLE_RATE = 16000
_SAMPLE_RATES = (8000, 48000)            # the range taken; Whisper hears 16 kHz, anything else is resampled
_MAX_PENDING_COMMITS = 16                # commits waiting for the one in flight; past this a commit is refused
_BYTES_PER_SAMPLE = 2
_CLOSED = (ConnectionClosed, WebsocketClosed)   # the client went away (receiving / sending)


class RealtimeError(Exception):
    """A client mistake answered with an error event (the session goes on)."""

    def __init__(self, message: str, code: str, param: str | None = None):
        super().__init__(message)
        self.message, self.code, self.param = message, code, param


@dataclass(frozen=True, slots=True)
class Session:
    """What session.update sets; each commit is transcribed with the session as it was when committed."""
    model: str | None = None
    language: str | None = None
    prompt: str = ""
    temperature: float = 0.0
    input_audio_format: str = "pcm16"
    input_audio_sample_rate: int = DEFAULT_SAMPLE_RATE

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True, slots=True)
class _Clip:
    pcm: bytes
    session: Session


async def serve_realtime(state: ServerState, request: Request, ws: WebsocketImplProtocol) -> None:
    await RealtimeConnection(state, ws, request.headers.get("authorization")).serve()


class RealtimeConnection:
    def __init__(self, state: ServerState, ws: WebsocketImplProtocol, authorization: str | None):
        self.state, self.ws, self.authorization = state, ws, authorization
        self.id = f"sess-{uuid.uuid4().hex}"
        self.session = Session()
        self.buffer = bytearray()                                   # PCM16 appended since the last commit
        self.clips: asyncio.Queue[_Clip] = asyncio.Queue()
        self._send_lock = asyncio.Lock()

    async def serve(self) -> None:
        try:
            self.state.check_ready()
        except APIError as e:
            await self.error(e.message, e.code or "not_ready")
            await self.ws.close(1013, "not ready")   # 1013: try again later
            return
        await self.send({"type": "session.created", "id": self.id, "created": int(time.time()),
                         "session": self.session.to_json()})
        worker = asyncio.create_task(self._transcribe_commits())
        try:
            while True:
                message = await self.ws.recv()
                if message is None:
                    continue
                try:
                    await self.handle(message)
                except RealtimeError as e:
                    await self.error(e.message, e.code, e.param)
                except APIError as e:
                    await self.error(e.message, e.code or e.type, e.param)
        except _CLOSED:
            pass
        finally:
            worker.cancel()   # NOTE: cancelling the worker closes its Transcription, which aborts the engine request
            await asyncio.gather(worker, return_exceptions=True)

    async def send(self, event: dict) -> None:
        async with self._send_lock:
            await self.ws.send(orjson.dumps(event).decode())

    async def error(self, message: str, code: str, param: str | None = None) -> None:
        event: dict[str, Any] = {"type": "error", "error": message, "code": code}
        if param is not None:
            event["param"] = param
        await self.send(event)

    async def handle(self, message: str | bytes) -> None:
        if not isinstance(message, str):
            raise RealtimeError("binary frames are not events: send JSON text frames (audio goes base64 in "
                                "input_audio_buffer.append)", "invalid_event")
        try:
            event = orjson.loads(message)
        except orjson.JSONDecodeError as e:
            raise RealtimeError(f"the message is not valid JSON: {e}", "invalid_json") from None
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            raise RealtimeError("an event must be a JSON object with a string 'type'", "invalid_event", "type")
        kind = event["type"]
        if kind == "session.update":
            await self._update(event)
        elif kind == "input_audio_buffer.append":
            self._append(event)
        elif kind == "input_audio_buffer.commit":
            self._commit()
        elif kind == "input_audio_buffer.clear":
            self.buffer.clear()
            await self.send({"type": "input_audio_buffer.cleared"})
        else:
            raise RealtimeError(f"unknown event type {kind!r}; this server takes session.update, "
                                "input_audio_buffer.append, input_audio_buffer.commit and input_audio_buffer.clear",
                                "unknown_event", "type")

    async def _update(self, event: dict) -> None:
        # vLLM's clients put the fields on the event; OpenAI's put them in "session": both are read.
        nested = event.get("session")
        fields = {**event, **nested} if isinstance(nested, dict) else event
        changes = parse_session_fields(fields)
        if "input_audio_sample_rate" in changes and self.buffer and \
                changes["input_audio_sample_rate"] != self.session.input_audio_sample_rate:
            raise RealtimeError("commit or clear the buffered audio before changing input_audio_sample_rate",
                                "buffer_not_empty", "input_audio_sample_rate")
        session = dataclasses.replace(self.session, **changes)
        if "model" in changes or "language" in changes:
            await self._check_model(session)
        self.session = session
        await self.send({"type": "session.updated", "session": session.to_json()})

    async def _check_model(self, session: Session) -> None:
        """Refuse a model that is not here or does not transcribe now, not at the first commit; its languages
        are known once it is loaded (an on_demand one's are checked at the commit that loads it)."""
        if session.model is None:
            return
        model = await find_speech_model(self.state, session.model, "transcribe", self.authorization)
        require_speech(self.state, model, "transcribe")
        if model.is_ready:
            check_language(model, session.language)

    def _append(self, event: dict) -> None:
        audio = event.get("audio")
        if not isinstance(audio, str):
            raise RealtimeError("'audio' must be a string of base64 PCM16 samples", "invalid_audio", "audio")
        try:
            pcm = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError):
            raise RealtimeError("'audio' is not valid base64", "invalid_audio", "audio") from None
        if len(pcm) % _BYTES_PER_SAMPLE:
            raise RealtimeError(f"'audio' must hold whole 16-bit samples (an even number of bytes), got {len(pcm)} "
                                "bytes", "invalid_audio", "audio")
        rate, limit = self.session.input_audio_sample_rate, self.state.settings.max_audio_s
        seconds = (len(self.buffer) + len(pcm)) / _BYTES_PER_SAMPLE / rate
        if seconds > limit:
            raise RealtimeError(f"the buffer would hold {seconds:.1f} s of audio; this server transcribes at most "
                                f"{limit:g} s per commit (server.max_audio_s): commit before appending more (this "
                                "chunk was dropped)", "audio_too_long", "audio")
        self.buffer += pcm

    def _commit(self) -> None:
        if self.session.model is None:
            raise RealtimeError("no model: send session.update with a speech model's name before committing audio",
                                "model_not_validated", "model")
        if not self.buffer:
            return   # vLLM's clients open a stream with an empty commit
        if self.clips.qsize() >= _MAX_PENDING_COMMITS:
            raise RealtimeError(f"{_MAX_PENDING_COMMITS} commits are already waiting; wait for their "
                                "transcription.done events (the buffer is kept)", "too_many_commits")
        self.clips.put_nowait(_Clip(bytes(self.buffer), self.session))
        self.buffer.clear()

    async def _transcribe_commits(self) -> None:
        while True:
            clip = await self.clips.get()
            try:
                await self._transcribe(clip)
            except _CLOSED:
                return
            except RealtimeError as e:
                await self.error(e.message, e.code, e.param)
            except APIError as e:
                await self.error(e.message, e.code or e.type, e.param)
            except Exception as e:  # a bug: the client hears of it, the session goes on
                log.exception("realtime transcription failed")
                await self.error(f"internal server error: {type(e).__name__}", "internal_error")

    async def _transcribe(self, clip: _Clip) -> None:
        state, session = self.state, clip.session
        model = await find_speech_model(state, session.model, "transcribe", self.authorization)
        require_speech(state, model, "transcribe")
        async with state.registry.using(model):
            language = check_language(model, session.language)
            prompt_ids = prompt_token_ids(model, session.prompt)
            with state.admitted():
                loop = asyncio.get_running_loop()
                audio = await loop.run_in_executor(None, _to_whisper_rate, clip.pcm, session.input_audio_sample_rate)
                check_length(audio, "audio")
                request = new_request(state.new_request_id("rt"), audio, task="transcribe", language=language,
                                      prompt_ids=prompt_ids, temperature=session.temperature, timestamps=False,
                                      seed=None)
                run = Transcription(model, request, state.settings.request_timeout_s)
                deltas = []
                async for text in run.stream():
                    deltas.append(text)
                    await self.send({"type": "transcription.delta", "delta": text})
                await self.send({"type": "transcription.done", "text": "".join(deltas).strip(),
                                 "usage": run.usage()})


def _to_whisper_rate(pcm: bytes, rate: int) -> np.ndarray:
    try:
        return resample(pcm16_to_float(pcm), rate)
    except AudioError as e:
        raise RealtimeError(str(e), "invalid_audio") from None


def parse_session_fields(fields: dict) -> dict[str, Any]:
    """The session.update fields present, checked; a wrong one is a RealtimeError naming it."""
    changes: dict[str, Any] = {}
    for key in ("model", "language", "prompt"):
        if key in fields:
            value = fields[key]
            if value is not None and not isinstance(value, str):
                raise RealtimeError(f"'{key}' must be a string", "invalid_session", key)
            changes[key] = (value or None) if key != "prompt" else (value or "")
    if "temperature" in fields:
        value = fields["temperature"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise RealtimeError(f"'temperature' must be a number between 0 and 1, got {value!r}", "invalid_session",
                                "temperature")
        changes["temperature"] = float(value)
    if "input_audio_format" in fields:
        if fields["input_audio_format"] != "pcm16":
            raise RealtimeError(f"'input_audio_format' must be 'pcm16' (16-bit little-endian mono), got "
                                f"{fields['input_audio_format']!r}", "invalid_session", "input_audio_format")
        changes["input_audio_format"] = "pcm16"
    if "input_audio_sample_rate" in fields:
        value, (lo, hi) = fields["input_audio_sample_rate"], _SAMPLE_RATES
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise RealtimeError(f"'input_audio_sample_rate' must be an integer from {lo} to {hi} Hz, got {value!r}",
                                "invalid_session", "input_audio_sample_rate")
        changes["input_audio_sample_rate"] = value
    return changes
