"""A stop string ending one of n samples tells the engine to stop that sample (it never sees text)."""
import pytest

from engine.loader import ModelFiles, load_tokenizer
from engine.messages import TokenOutput
from engine.sampling_params import SamplingParams
from launcher.server.generation import SampleText, push_output


class RecordingEngine:
    def __init__(self):
        self.stopped: list[tuple[str, int]] = []

    def stop_sample(self, request_id: str, index: int) -> None:
        self.stopped.append((request_id, index))


@pytest.fixture(scope="module")
def tokenizer(default_gguf_path):
    return load_tokenizer(ModelFiles.at(default_gguf_path))


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def test_stop_string_stops_the_engine_sample_once(tokenizer):
    engine = RecordingEngine()
    sample = SampleText(tokenizer, [], SamplingParams(stop=["world"]))
    delta = push_output(engine, sample, TokenOutput("r", 1, ids(tokenizer, "hello")))
    assert delta.finish_reason is None and engine.stopped == []
    delta = push_output(engine, sample, TokenOutput("r", 1, ids(tokenizer, " world and more")))
    assert delta.finish_reason == "stop" and sample.text == "hello " and engine.stopped == [("r", 1)]
    # the engine's own final output for the sample arrives later: ignored, and no second stop
    push_output(engine, sample, TokenOutput("r", 1, [], finish_reason="stop"))
    assert engine.stopped == [("r", 1)] and sample.text == "hello "


def test_a_sample_the_engine_finished_is_not_stopped_again(tokenizer):
    engine = RecordingEngine()
    sample = SampleText(tokenizer, [], SamplingParams(stop=["world"]))
    delta = push_output(engine, sample, TokenOutput("r", 0, ids(tokenizer, "hello world"), finish_reason="length"))
    assert delta.finish_reason == "stop" and engine.stopped == []
    sample = SampleText(tokenizer, [], SamplingParams(max_tokens=2))
    push_output(engine, sample, TokenOutput("r", 0, ids(tokenizer, "hi there"), finish_reason="length"))
    assert sample.finish_reason == "length" and engine.stopped == []
