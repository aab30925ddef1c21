"""A stop string ending one of n samples tells the engine to stop that sample (it never sees text).

Driven through the server's Generation over a scripted EngineClient: the same path the handlers take."""
import asyncio

import pytest

from engine.config import EngineConfig
from engine.loader import ModelFiles, load_tokenizer
from engine.messages import EngineInfo, TokenOutput
from engine.sampling_params import SamplingParams
from launcher.server.generation import EnginePrompt, Generation
from launcher.server.served_model import ServedModel
from launcher.server.settings import ModelSettings
from tests.launcher.server.scripted_client import ScriptedClient


class ScriptedEngine(ScriptedClient):
    """Answers every request with the same outputs: (sample index, text, finish reason) each."""

    def __init__(self, tokenizer, script: list[tuple[int, str, str | None]]):
        super().__init__(EngineInfo("m", 2048, 1, 16, 16, "cpu", "float32", (), tokenizer.vocab_size, False, 0.0))
        self.tokenizer, self.script = tokenizer, script
        self.stopped: list[tuple[str, int]] = []

    async def generate(self, request_id, prompt_token_ids, params, *, images=()):
        for index, text, finish in self.script:
            yield TokenOutput(request_id, index, self.tokenizer.encode(text, add_special_tokens=False),
                              finish_reason=finish)

    def stop_sample(self, request_id, index):
        self.stopped.append((request_id, index))


@pytest.fixture(scope="module")
def tokenizer(default_gguf_path):
    return load_tokenizer(ModelFiles.at(default_gguf_path))


def run(tokenizer, script, params):
    """(delta, the engine's stop_sample calls so far) for every delta the generation yields."""
    engine = ScriptedEngine(tokenizer, script)
    model = ServedModel(ModelSettings(EngineConfig(model="unused"), ("m",)), new_client=lambda config: engine)
    model.tokenizer = tokenizer
    gen = Generation(model, "r", [EnginePrompt([1, 2, 3], params)], timeout_s=None)

    async def collect():
        return [(delta, list(engine.stopped)) async for delta in gen.stream()]

    return asyncio.run(collect()), gen


def test_stop_string_stops_the_engine_sample_once(tokenizer):
    script = [(1, "hello", None), (1, " world and more", None),
              (1, "", "stop"),            # the engine's own final output for the sample arrives later
              (0, "fine", "length")]
    steps, gen = run(tokenizer, script, SamplingParams(n=2, stop=["world"]))
    (first, stops1), (second, stops2), (late, stops3), (last, stops4) = steps
    assert first.finish_reason is None and stops1 == []
    assert second.finish_reason == "stop" and stops2 == [("r-0", 1)]
    assert gen.samples[1].text == "hello " and gen.samples[1].stop_reason == "world"
    # ignored, and no second stop
    assert late.text == "" and late.finish_reason is None and stops3 == stops4 == [("r-0", 1)]
    assert last.index == 0 and last.finish_reason == "length" and gen.samples[1].text == "hello "


def test_a_sample_the_engine_finished_is_not_stopped_again(tokenizer):
    steps, gen = run(tokenizer, [(0, "hello world", "length")], SamplingParams(stop=["world"]))
    assert steps[-1][0].finish_reason == "stop" and steps[-1][1] == []
    steps, gen = run(tokenizer, [(0, "hi there", "length")], SamplingParams(max_tokens=2))
    assert gen.samples[0].finish_reason == "length" and steps[-1][1] == []
