"""Request parsing for /v1/audio/transcriptions and /v1/audio/translations: multipart form fields -> AudioRequest.

Form values arrive as strings; each is read as its field's type, and a wrong one is a 400 naming the field (the
same envelope as the JSON endpoints). Field names are OpenAI's, plus vLLM's flattened stream options."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NoReturn

from launcher.server.errors import bad_request
from launcher.server.transcript_formats import FORMATS, TIMESTAMPED

MULTIPART = "multipart/form-data"
_SEED_RANGE = (-(2**63), 2**63 - 1)
_TRUE, _FALSE = ("true", "1"), ("false", "0")


@dataclass(frozen=True, slots=True)
class AudioRequest:
    task: str                            # 'transcribe' | 'translate' (the endpoint)
    audio: bytes                         # the uploaded file, not decoded yet
    model: str | None = None             # None: the server's first speech model
    language: str | None = None          # as the client wrote it (checked against the model's languages later)
    prompt: str = ""
    response_format: str = "json"
    timestamp_granularities: tuple[str, ...] = ()
    temperature: float = 0.0
    stream: bool = False
    include_usage: bool = False          # vLLM's stream_include_usage: a final usage chunk
    continuous_usage_stats: bool = False  # vLLM's stream_continuous_usage_stats: usage on every chunk
    seed: int | None = None

    @property
    def timestamps(self) -> bool:
        """Whether the engine must decode timestamp tokens: segment times are part of the answer."""
        return self.response_format in TIMESTAMPED or "segment" in self.timestamp_granularities


class _Form:
    """Typed readers over form fields (every value a string); a field sent twice keeps its last value."""

    def __init__(self, fields: Mapping[str, Sequence[str]]):
        self.fields = fields

    def raw(self, key: str) -> str | None:
        values = self.fields.get(key)
        return values[-1] if values else None

    def fail(self, key: str, expected: str, value: str) -> NoReturn:
        shown = f" ({value!r})" if len(value) < 60 else ""
        raise bad_request(f"'{key}' must be {expected}, got a string{shown}", key)

    def str(self, key: str, default: str | None = None) -> str | None:
        value = self.raw(key)
        return default if value is None else value

    def bool(self, key: str) -> bool:
        value = self.raw(key)
        if value is None or value.strip().lower() in _FALSE:
            return False
        if value.strip().lower() in _TRUE:
            return True
        self.fail(key, "a boolean (true or false)", value)

    def float(self, key: str, default: float, lo: float, hi: float) -> float:
        value = self.raw(key)
        if value is None or not value.strip():
            return default
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not math.isfinite(number):
            self.fail(key, f"a number between {lo:g} and {hi:g}", value)
        if not lo <= number <= hi:
            raise bad_request(f"'{key}' must be between {lo:g} and {hi:g}, got {number:g}", key)
        return number

    def int(self, key: str, lo: int, hi: int) -> int | None:
        value = self.raw(key)
        if value is None or not value.strip():
            return None
        try:
            number = int(value)
        except ValueError:
            self.fail(key, "an integer", value)
        if not lo <= number <= hi:
            raise bad_request(f"'{key}' must be between {lo} and {hi}, got {number}", key)
        return number


def parse_audio_request(task: str, content_type: str, fields: Mapping[str, Sequence[str]],
                        files: Mapping[str, Sequence[bytes]]) -> AudioRequest:
    """`fields`: the form's text fields; `files`: its file parts' bytes, by field name."""
    assert task in ("transcribe", "translate"), task
    if not content_type.startswith(MULTIPART):
        raise bad_request(f"the audio endpoints take a {MULTIPART} body with the audio in 'file', got "
                          f"{content_type.split(';')[0] or 'no content type'}", "file")
    f = _Form(fields)
    if not files.get("file"):
        if f.raw("file") is not None:
            raise bad_request("'file' must be a file upload (a form part with a filename), not a text field", "file")
        raise bad_request("'file' is required: the audio to transcribe, as a file part of the form", "file")
    audio = files["file"][-1]
    if not audio:
        raise bad_request("the audio file is empty", "file")
    model = f.str("model") or None
    language = (f.str("language") or "").strip() or None
    if task == "translate" and language is not None:
        raise bad_request("'language' is not taken by /v1/audio/translations: the output is always English and "
                          "the spoken language is detected; use /v1/audio/transcriptions to name it", "language")
    response_format = f.str("response_format", "json").strip()
    if response_format not in FORMATS:
        raise bad_request(f"'response_format' must be one of {', '.join(FORMATS)}, got {response_format!r}",
                          "response_format")
    granularities = _granularities(f, response_format)
    stream = f.bool("stream")
    include_usage, continuous = f.bool("stream_include_usage"), f.bool("stream_continuous_usage_stats")
    if not stream and (include_usage or continuous):
        key = "stream_include_usage" if include_usage else "stream_continuous_usage_stats"
        raise bad_request(f"'{key}' is only allowed when 'stream' is true", key)
    if stream and response_format not in ("json", "text"):
        raise bad_request(f"a stream sends text deltas: 'response_format' must be json or text with 'stream', "
                          f"got {response_format!r}", "response_format")
    return AudioRequest(
        task=task, audio=audio, model=model, language=language, prompt=f.str("prompt", ""),
        response_format=response_format, timestamp_granularities=granularities,
        temperature=f.float("temperature", 0.0, 0.0, 1.0), stream=stream, include_usage=include_usage,
        continuous_usage_stats=continuous, seed=f.int("seed", *_SEED_RANGE))


def _granularities(f: _Form, response_format: str) -> tuple[str, ...]:
    """timestamp_granularities[] (the name OpenAI's clients send; plain timestamp_granularities too)."""
    values = [*f.fields.get("timestamp_granularities[]", ()), *f.fields.get("timestamp_granularities", ())]
    wanted = tuple(dict.fromkeys(v.strip() for v in values if v.strip()))
    for value in wanted:
        if value == "word":
            raise bad_request("'timestamp_granularities' word is not supported: this server gives segment "
                              "timestamps only", "timestamp_granularities")
        if value != "segment":
            raise bad_request(f"'timestamp_granularities' must hold 'segment' (or 'word', which is not "
                              f"supported), got {value!r}", "timestamp_granularities")
    if wanted and response_format != "verbose_json":
        raise bad_request("'timestamp_granularities' needs 'response_format' verbose_json (as OpenAI's API has it)",
                          "timestamp_granularities")
    return wanted
