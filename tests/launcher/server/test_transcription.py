"""Transcription (the server's side of one clip) over a scripted speech engine: text deltas, segments, the engine's
errors as HTTP ones, and leaving early closing the engine's stream (which aborts it).

Handler-level only: the real engine, server and clients are in test_audio_api.py."""
import asyncio

import numpy as np
import pytest

from engine.config import EngineConfig
from engine.messages import EngineInfo, TranscribeRequest, TranscriptionOutput, TranscriptionSegment
from launcher.server.errors import APIError
from launcher.server.served_model import ServedModel, load_server_tokenizer
from launcher.server.settings import ModelSettings
from launcher.server.transcription import Transcription, check_language, prompt_token_ids
from tests.launcher.server.scripted_client import ScriptedClient

TEXT = [" Hello", " world.", " How", " are", " you?"]


class ScriptedSpeechEngine(ScriptedClient):
    """Answers every clip with the same outputs (built by `script(tokenizer)`); records whether its stream closed."""

    def __init__(self, outputs: list[TranscriptionOutput], languages=("en",)):
        super().__init__(EngineInfo("w", 448, 1, 16, 16, "cpu", "float32", (50256,), 51864, False, 0.0,
                                    is_speech_model=True, languages=languages))
        self.outputs = outputs
        self.closed = False

    async def transcribe(self, request):
        try:
            for out in self.outputs:
                yield out
        finally:
            self.closed = True


@pytest.fixture(scope="module")
def tokenizer(whisper_tiny_en_path):
    return load_server_tokenizer(whisper_tiny_en_path)


def served(engine: ScriptedSpeechEngine, tokenizer) -> ServedModel:
    model = ServedModel(ModelSettings(EngineConfig(model="unused"), ("w",)), new_client=lambda config: engine)
    model.tokenizer = tokenizer
    return model


def outputs(tokenizer, finish: str = "stop", error: str | None = None) -> list[TranscriptionOutput]:
    ids = [tokenizer.encode(t, add_special_tokens=False) for t in TEXT]
    segments = [TranscriptionSegment(0, 0.0, 1.5, ids[0] + ids[1], -0.2, 0.01, 0.0),
                TranscriptionSegment(1, 1.5, 3.0, ids[2] + ids[3] + ids[4], -0.3, 0.02, 0.0)]
    return [TranscriptionOutput("r", ids[0], language="en", duration=3.0, num_tokens=2),
            TranscriptionOutput("r", ids[1], segments[:1], "en", 3.0, num_tokens=4),
            TranscriptionOutput("r", ids[2] + ids[3] + ids[4], segments[1:], "en", 3.0, num_tokens=9),
            TranscriptionOutput("r", [], [], "en", 3.0, finished=True, finish_reason=finish, num_tokens=10,
                                error=error)]


def request() -> TranscribeRequest:
    return TranscribeRequest("r", np.zeros(48000, np.float32), prompt_token_ids=[1, 2, 3])


def collect(run: Transcription, limit: int | None = None) -> list[str]:
    async def go():
        deltas = []
        async for text in run.stream():
            deltas.append(text)
            if limit is not None and len(deltas) == limit:
                break
        return deltas
    return asyncio.run(go())


def test_deltas_segments_and_usage(tokenizer):
    engine = ScriptedSpeechEngine(outputs(tokenizer))
    model = served(engine, tokenizer)
    run = Transcription(model, request(), timeout_s=None)
    deltas = collect(run)
    assert deltas == ["Hello", " world.", " How are you?"]   # Whisper's leading space dropped once
    assert run.segment_texts() == [" Hello world.", " How are you?"] and run.text == "Hello world. How are you?"
    assert run.finish_reason == "stop" and run.language == "en" and run.duration == 3.0
    assert run.usage()["prompt_tokens"] == 3 and run.usage()["completion_tokens"] == 10
    assert model.metrics.finished["stop"] == 1 and engine.closed


@pytest.mark.parametrize("finish, error, status, code", [("error", "boom", 500, "engine_error"),
                                                         ("abort", None, 503, "aborted")])
def test_engine_errors_become_http_errors(tokenizer, finish, error, status, code):
    model = served(ScriptedSpeechEngine(outputs(tokenizer, finish, error)), tokenizer)
    with pytest.raises(APIError) as e:
        collect(Transcription(model, request(), timeout_s=None))
    assert (e.value.status, e.value.code) == (status, code)
    assert model.metrics.finished[finish] == 1


def test_leaving_early_closes_the_engine_stream(tokenizer):
    engine = ScriptedSpeechEngine(outputs(tokenizer))
    model = served(engine, tokenizer)
    assert collect(Transcription(model, request(), timeout_s=None), limit=1) == ["Hello"]
    assert engine.closed and model.metrics.finished["abort"] == 1


def test_languages_and_prompts(tokenizer):
    model = served(ScriptedSpeechEngine(outputs(tokenizer), languages=("en", "de")), tokenizer)
    assert check_language(model, None) is None
    assert check_language(model, "German") == "de" and check_language(model, "en") == "en"
    for bad in ("fr", "klingon"):
        with pytest.raises(APIError) as e:
            check_language(model, bad)
        assert e.value.param == "language" and e.value.code == "unsupported_language"
        assert "en, de" in e.value.message
    assert prompt_token_ids(model, "  ") == []
    ids = prompt_token_ids(model, "Hello there.")
    assert tokenizer.decode(ids) == " Hello there."   # Whisper's prompts start with a space
    assert len(prompt_token_ids(model, "word " * 500)) == 448 // 2 - 1   # the last 223 tokens, as Whisper keeps
