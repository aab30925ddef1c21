"""A finished transcript in OpenAI's audio response formats: json, text, srt, vtt and verbose_json."""
from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Sequence

from engine.messages import TranscriptionSegment
from launcher.server.speech_languages import language_name

FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
TIMESTAMPED = ("srt", "verbose_json", "vtt")        # formats that need the engine to decode timestamp tokens
CONTENT_TYPES = {"json": "application/json", "verbose_json": "application/json",
                 "text": "text/plain; charset=utf-8", "srt": "text/plain; charset=utf-8",
                 "vtt": "text/vtt; charset=utf-8"}


def full_text(segment_texts: Iterable[str]) -> str:
    """The whole transcript: Whisper's text starts with a space, which OpenAI strips."""
    return "".join(segment_texts).strip()


def duration_usage(duration: float) -> dict:
    """OpenAI's usage for duration-billed models (whisper-1): whole seconds, rounded up."""
    return {"type": "duration", "seconds": math.ceil(duration)}


def compression_ratio(text: str) -> float:
    """Whisper's hallucination signal: how well the text compresses (over 2.4: likely a repetition loop)."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def segment_json(segment: TranscriptionSegment, text: str) -> dict:
    """One verbose_json segment. `seek` counts 10 ms mel frames, as Whisper's does; the engine reports where a
    segment starts, not the window it was decoded in, so this is the segment's own start frame."""
    return {"id": segment.id, "seek": round(segment.start * 100), "start": segment.start, "end": segment.end,
            "text": text, "tokens": list(segment.token_ids), "temperature": segment.temperature,
            "avg_logprob": segment.avg_logprob, "compression_ratio": compression_ratio(text),
            "no_speech_prob": segment.no_speech_prob}


def verbose_json(task: str, language: str | None, duration: float, segments: Sequence[dict]) -> dict:
    """OpenAI's verbose_json: the language by name ("english"), duration in seconds, every segment. Transcriptions
    carry usage; translations do not (OpenAI's and vLLM's translation objects have none)."""
    body = {"task": task, "language": language_name(language), "duration": duration,
            "text": full_text(s["text"] for s in segments), "segments": list(segments)}
    if task == "transcribe":
        body["usage"] = duration_usage(duration)
    return body


def timestamp(seconds: float, decimal_marker: str) -> str:
    """HH:MM:SS,mmm (SRT, decimal_marker ',') or HH:MM:SS.mmm (WebVTT, '.')."""
    ms = max(0, round(seconds * 1000))
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal_marker}{ms:03d}"


def _cue_text(text: str) -> str:
    # NOTE: "-->" inside a cue would read as a new timing line to SRT and WebVTT parsers (Whisper's writers do this).
    return text.strip().replace("-->", "->")


def srt(segments: Sequence[dict]) -> str:
    """SubRip: numbered cues from 1, a blank line after each."""
    return "".join(f"{i}\n{timestamp(s['start'], ',')} --> {timestamp(s['end'], ',')}\n{_cue_text(s['text'])}\n\n"
                   for i, s in enumerate(segments, start=1))


def vtt(segments: Sequence[dict]) -> str:
    """WebVTT: the header, then one cue per segment."""
    return "WEBVTT\n\n" + "".join(
        f"{timestamp(s['start'], '.')} --> {timestamp(s['end'], '.')}\n{_cue_text(s['text'])}\n\n" for s in segments)
