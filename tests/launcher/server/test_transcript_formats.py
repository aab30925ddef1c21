"""OpenAI's audio response formats from segments: timestamps, SRT, WebVTT, verbose_json."""
import zlib

import pytest

from engine.messages import TranscriptionSegment
from launcher.server.speech_languages import LANGUAGE_NAMES, language_code, language_name
from launcher.server.transcript_formats import (compression_ratio, duration_usage, full_text, segment_json, srt,
                                                timestamp, verbose_json, vtt)


def seg(i: int, start: float, end: float, tokens=(1, 2)) -> TranscriptionSegment:
    return TranscriptionSegment(i, start, end, list(tokens), -0.25, 0.01, 0.0)


SEGMENTS = [segment_json(seg(0, 0.0, 2.5), " Hello world."),
            segment_json(seg(1, 2.5, 3661.0421), " Is it --> me?")]


@pytest.mark.parametrize("seconds, srt_form, vtt_form", [
    (0.0, "00:00:00,000", "00:00:00.000"), (2.5, "00:00:02,500", "00:00:02.500"),
    (59.9996, "00:01:00,000", "00:01:00.000"), (3661.0421, "01:01:01,042", "01:01:01.042"),
    (36000.0, "10:00:00,000", "10:00:00.000"), (-0.01, "00:00:00,000", "00:00:00.000")])
def test_timestamps(seconds, srt_form, vtt_form):
    assert timestamp(seconds, ",") == srt_form and timestamp(seconds, ".") == vtt_form


def test_srt_numbers_cues_from_one_and_strips_their_text():
    assert srt(SEGMENTS) == ("1\n00:00:00,000 --> 00:00:02,500\nHello world.\n\n"
                             "2\n00:00:02,500 --> 01:01:01,042\nIs it -> me?\n\n")
    assert srt([]) == ""


def test_vtt_has_its_header_and_dotted_times():
    assert vtt(SEGMENTS) == ("WEBVTT\n\n00:00:00.000 --> 00:00:02.500\nHello world.\n\n"
                             "00:00:02.500 --> 01:01:01.042\nIs it -> me?\n\n")
    assert vtt([]) == "WEBVTT\n\n"


def test_segment_json_has_every_field_openai_gives():
    s = SEGMENTS[0]
    assert set(s) == {"id", "seek", "start", "end", "text", "tokens", "temperature", "avg_logprob",
                      "compression_ratio", "no_speech_prob"}
    assert (s["id"], s["seek"], s["start"], s["end"], s["text"], s["tokens"]) == (0, 0, 0.0, 2.5, " Hello world.",
                                                                                 [1, 2])
    assert SEGMENTS[1]["seek"] == 250   # 10 ms frames
    data = " Hello world.".encode()
    assert s["compression_ratio"] == pytest.approx(len(data) / len(zlib.compress(data)))
    assert compression_ratio("") == 0.0
    assert compression_ratio("la " * 200) > 2.4   # a repetition loop compresses well


def test_verbose_json():
    body = verbose_json("transcribe", "en", 3.2, SEGMENTS)
    assert body["task"] == "transcribe" and body["language"] == "english" and body["duration"] == 3.2
    assert body["text"] == "Hello world. Is it --> me?" and body["segments"] == SEGMENTS
    assert body["usage"] == {"type": "duration", "seconds": 4}
    translated = verbose_json("translate", "de", 1.0, [])
    assert translated["language"] == "german" and translated["text"] == "" and "usage" not in translated


def test_text_and_usage():
    assert full_text([" Hello", " world. "]) == "Hello world."
    assert duration_usage(0.2) == {"type": "duration", "seconds": 1}
    assert duration_usage(3.0) == {"type": "duration", "seconds": 3}


def test_languages():
    assert len(LANGUAGE_NAMES) == 100 and len(set(LANGUAGE_NAMES.values())) == 100
    assert language_code("en") == "en" and language_code(" English ") == "en" and language_code("yue") == "yue"
    assert language_code("klingon") is None
    assert language_name("ht") == "haitian creole" and language_name("xx") == "xx" and language_name(None) == ""
