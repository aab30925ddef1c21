"""Constrained decoding on the default model: outputs always satisfy the schema / regex / choice."""
import json
import re
import time

import pytest

from engine.config import EngineConfig
from engine.core import EngineCore
from engine.loader import ModelFiles, load_tokenizer
from engine.messages import AddRequest
from engine.sampling_params import SamplingParams, StructuredOutputs
from engine.structured import StructuredOutputError, validate
from tests.engine.helpers import run_to_completion


@pytest.fixture(scope="module")
def core_and_tokenizer(default_gguf_path):
    core = EngineCore(EngineConfig(model=default_gguf_path, kv_cache_gib=0.25, max_model_len=1024))
    return core, load_tokenizer(ModelFiles.at(default_gguf_path))


def chat(tokenizer, question: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}])
    return tokenizer.encode(text, add_special_tokens=False)


def test_outputs_follow_their_constraints(core_and_tokenizer):
    core, tok = core_and_tokenizer
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    choices = ("Paris", "London", "Berlin")
    params = [
        SamplingParams(temperature=0, max_tokens=60, structured_outputs=StructuredOutputs(json=json.dumps(schema))),
        SamplingParams(temperature=1.0, seed=7, max_tokens=10, structured_outputs=StructuredOutputs(choice=choices)),
        SamplingParams(temperature=0, max_tokens=20, structured_outputs=StructuredOutputs(regex=r"[0-9]{3}-[0-9]{4}")),
        SamplingParams(temperature=0, max_tokens=120, structured_outputs=StructuredOutputs(json_object=True)),
        SamplingParams(temperature=0, max_tokens=12),  # an unconstrained batch mate
    ]
    prompts = [chat(tok, q) for q in ("Describe a person as JSON.", "Capital of France?",
                                      "Give me a phone number.", "Reply with the JSON object {\"answer\": \"yes\"} and nothing else.", "Say hi.")]
    out = run_to_completion(core, prompts, params)
    texts = [tok.decode(out[f"r{i}"]) for i in range(len(prompts))]
    person = json.loads(texts[0])
    assert set(person) == {"name", "age"} and isinstance(person["age"], int)
    assert texts[1] in choices
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", texts[2]), texts
    assert isinstance(json.loads(texts[3]), dict)
    assert all(out[f"r{i}"][-1] in core.eos_token_ids for i in range(4)), "a finished grammar ends with eos"
    assert core.stats().scheduler.num_blocks_used == 0


def test_invalid_constraints_are_refused():
    with pytest.raises(StructuredOutputError):
        validate(StructuredOutputs(json='{"type": "nope"}'))
    with pytest.raises(StructuredOutputError):
        validate(StructuredOutputs(json="{not json"))
    with pytest.raises(StructuredOutputError):
        validate(StructuredOutputs(regex="(unclosed"))
    validate(StructuredOutputs(choice=("a", "b")))


def test_engine_answers_a_bad_grammar_with_an_error_output(core_and_tokenizer):
    core, tok = core_and_tokenizer
    bad = SamplingParams(max_tokens=5, structured_outputs=StructuredOutputs(regex="(unclosed"))
    outputs = core.add_request(AddRequest("bad", chat(tok, "hi"), bad, time.monotonic()))
    assert outputs and outputs[0].finish_reason == "error" and "structured" in outputs[0].error
    assert not core.has_work()
