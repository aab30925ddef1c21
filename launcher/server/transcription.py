"""Transcription: one clip through a speech model's engine, from its outputs to text deltas and final segments.

The audio handlers and the realtime socket build one per clip, read its text deltas as the engine makes tokens
final, and format what it holds at the end; this is where the engine's errors become HTTP ones (the realtime
socket sends them as error events)."""
from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from engine.audio import SAMPLE_RATE, AudioError, decode_audio
from engine.detokenizer import IncrementalDetokenizer
from engine.messages import TranscribeRequest, TranscriptionOutput, TranscriptionSegment
from launcher.server.errors import APIError, bad_request
from launcher.server.generation import merge_outputs
from launcher.server.responses import usage
from launcher.server.served_model import ServedModel
from launcher.server.speech_languages import language_code
from launcher.server.transcript_formats import full_text

if TYPE_CHECKING:
    import numpy as np

MIN_SAMPLES = SAMPLE_RATE // 100     # one 10 ms mel frame


async def decode_upload(data: bytes, max_seconds: float) -> np.ndarray:
    """An uploaded file as 16 kHz mono samples, decoded in a worker thread so the event loop keeps serving;
    a file that is not audio (or is too long) is a 400 on `file`."""
    loop = asyncio.get_running_loop()
    try:
        audio = await loop.run_in_executor(None, functools.partial(decode_audio, data, max_seconds=max_seconds))
    except AudioError as e:
        raise bad_request(str(e), "file", "invalid_audio") from None
    check_length(audio, "file")
    return audio


def check_length(audio: np.ndarray, param: str) -> None:
    """The engine needs one mel frame (10 ms) of audio; less is the client's mistake, not an engine error."""
    if len(audio) < MIN_SAMPLES:
        raise bad_request(f"the audio is {len(audio) / SAMPLE_RATE * 1000:.1f} ms long; at least 10 ms is needed",
                          param, "invalid_audio")


def check_language(model: ServedModel, language: str | None, param: str = "language") -> str | None:
    """The ISO code of a requested language (a code or an English name) the model takes; None: detect it."""
    if language is None:
        return None
    taken = model.info.languages
    code = language_code(language)
    if code is None or (taken and code not in taken):
        choices = ", ".join(taken) if len(taken) <= 20 else f"{len(taken)} ISO 639-1 codes: {', '.join(taken)}"
        raise bad_request(f"the model `{model.names[0]}` does not take the language {language!r}; it takes "
                          f"{choices}", param, "unsupported_language")
    return code


def prompt_token_ids(model: ServedModel, prompt: str) -> list[int]:
    """The user's prompt as text tokens. Whisper is trained on previous-text prompts that begin with a space
    (openai/whisper encodes " " + prompt.strip()), and keeps the last max_model_len // 2 - 1 of them."""
    prompt = prompt.strip()
    if not prompt:
        return []
    ids = model.tokenizer.encode(" " + prompt, add_special_tokens=False)
    keep = max(0, model.info.max_model_len // 2 - 1)
    return ids[-keep:] if keep else []


class Transcription:
    """One TranscribeRequest: `stream()` yields text as the engine makes tokens final (the first delta without
    Whisper's leading space); afterwards `segments`, `language`, `duration` and the counts describe the clip."""

    def __init__(self, model: ServedModel, request: TranscribeRequest, timeout_s: float | None):
        assert model.info.is_speech_model, "a Transcription needs a speech model"
        self.model = model
        self.request = request
        self.created = int(time.time())
        self.segments: list[TranscriptionSegment] = []
        self.language = request.language
        self.duration = len(request.audio) / SAMPLE_RATE
        self.num_tokens = 0
        self.finish_reason: str | None = None
        self._timeout_s = timeout_s
        self._detokenizer = IncrementalDetokenizer(model.tokenizer, [])
        self._started = False   # whether any text went out (until then leading whitespace is dropped)

    async def stream(self) -> AsyncIterator[str]:
        timer = self.model.metrics.timer()
        outputs = merge_outputs([self.model.client.transcribe(self.request)], self._timeout_s)
        try:
            async with contextlib.aclosing(outputs) as items:
                async for out in items:
                    text = self._take(out)
                    timer.tokens(len(out.new_token_ids))
                    if text:
                        yield text
                    if out.finished:
                        break
        finally:   # NOTE: also when the client left (the generator closed early): /metrics counts it as an abort
            timer.finish(self.finish_reason or "abort", len(self.request.prompt_token_ids), self.num_tokens)

    def _take(self, out: TranscriptionOutput) -> str:
        """Record one output; the text it makes final."""
        if out.error is not None or out.finish_reason == "error":
            self.finish_reason = "error"
            raise APIError(500, f"transcription failed: {out.error or 'engine error'}", "server_error",
                           code="engine_error")
        if out.finish_reason == "abort":
            self.finish_reason = "abort"
            raise APIError(503, "the request was aborted (the server is shutting down)", "service_unavailable_error",
                           code="aborted")
        self.segments += out.segments
        self.language = out.language or self.language
        self.duration = out.duration or self.duration
        self.num_tokens = max(self.num_tokens, out.num_tokens)
        text = self._detokenizer.push(out.new_token_ids)
        if out.finished:
            self.finish_reason = out.finish_reason or "stop"
            text += self._detokenizer.flush()
        if not self._started:
            text = text.lstrip()
            self._started = bool(text)
        return text

    async def run(self) -> None:
        async for _ in self.stream():
            pass

    def segment_texts(self) -> list[str]:
        """Each segment's text, as Whisper writes it (a leading space, no special tokens)."""
        return [self.model.tokenizer.decode(s.token_ids) for s in self.segments]

    @property
    def text(self) -> str:
        return full_text(self.segment_texts())

    def usage(self) -> dict:
        """Token usage (what vLLM's transcription stream reports): the prompt, then the decoder's tokens."""
        return usage(len(self.request.prompt_token_ids), self.num_tokens)


def new_request(request_id: str, audio: np.ndarray, *, task: str, language: str | None, prompt_ids: list[int],
                temperature: float, timestamps: bool, seed: int | None) -> TranscribeRequest:
    return TranscribeRequest(request_id, audio, task=task, language=language, prompt_token_ids=prompt_ids,
                             temperature=temperature, timestamps=timestamps, seed=seed,
                             arrival_time=time.monotonic())
