"""The output processor: engine outputs -> per-sample text, finish reasons, logprobs; errors as values."""
import pytest

from engine.loader import ModelFiles, load_tokenizer
from engine.messages import TokenLogprob, TokenOutput
from engine.output_processor import GenerationError, OutputProcessor
from engine.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def tokenizer(default_gguf_path):
    return load_tokenizer(ModelFiles.at(default_gguf_path))


def ids(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def test_samples_are_numbered_across_requests_and_finish_independently(tokenizer):
    p = OutputProcessor(tokenizer)
    a = p.add_request("a", [1, 2], SamplingParams(n=2))
    b = p.add_request("b", [1, 2], SamplingParams(n=2), first_index=2)
    assert [s.index for s in a + b] == [0, 1, 2, 3]
    delta = p.process(TokenOutput("b", 1, ids(tokenizer, "hello"), finish_reason="length"))
    assert (delta.index, delta.text, delta.finish_reason) == (3, "hello", "length")
    assert p.is_finished("a") is False and not p.all_finished
    for out in (TokenOutput("a", 0, [], finish_reason="length"), TokenOutput("a", 1, [], finish_reason="length"),
                TokenOutput("b", 0, [], finish_reason="length")):
        p.process(out)
    assert p.all_finished and p.process(TokenOutput("gone", 0, [1])) is None


def test_eos_is_not_text_unless_stops_are_kept(tokenizer):
    eos = tokenizer.token_to_id("<|im_end|>")
    for keep, expected in ((False, "Hi"), (True, "Hi<|im_end|>")):
        p = OutputProcessor(tokenizer)
        [sample] = p.add_request("r", [1], SamplingParams(include_stop_str_in_output=keep,
                                                          skip_special_tokens=False))
        delta = p.process(TokenOutput("r", 0, ids(tokenizer, "Hi") + [eos], finish_reason="stop",
                                      stop_token_id=eos))
        assert delta.text == expected and sample.stop_reason == eos and sample.token_ids[-1] == eos


def test_engine_errors_and_aborts_come_back_as_values(tokenizer):
    p = OutputProcessor(tokenizer)
    p.add_request("r", [1], SamplingParams(n=2))
    error = p.process(TokenOutput("r", 0, [], finish_reason="error", error="boom"))
    assert isinstance(error, GenerationError) and error.code == "engine_error" and "boom" in error.message
    abort = p.process(TokenOutput("r", 1, [], finish_reason="abort"))
    assert isinstance(abort, GenerationError) and abort.code == "aborted"


def test_logprobs_prompt_logprobs_and_cached_tokens(tokenizer):
    p = OutputProcessor(tokenizer)
    [sample] = p.add_request("r", [5, 6], SamplingParams(logprobs=1, prompt_logprobs=0))
    prompt = [TokenLogprob(5, None), TokenLogprob(6, -1.5)]
    first = TokenLogprob(7, -0.25, [(7, -0.25)])
    p.process(TokenOutput("r", 0, [7], [first], prompt_logprobs=prompt, num_cached_tokens=0))
    last = TokenLogprob(8, -0.5, [(9, -0.1)])
    delta = p.process(TokenOutput("r", 0, [8], [last], finish_reason="length", num_cached_tokens=16))
    assert delta.logprobs == [last] and sample.logprobs == [first, last] and sample.cumulative_logprob == -0.75
    assert p.prompt_logprobs("r") == prompt and p.num_cached_tokens("r") == 16


def test_a_stop_string_asks_to_stop_the_engine_sample_and_score_only_drops_the_token(tokenizer):
    p = OutputProcessor(tokenizer)
    [sample] = p.add_request("r", [1], SamplingParams(stop=["."]))
    delta = p.process(TokenOutput("r", 0, ids(tokenizer, "Yes. And")))
    assert delta.stops_engine_sample and delta.text == "Yes" and sample.stop_reason == "."
    assert p.process(TokenOutput("r", 0, [], finish_reason="stop")).finish_reason is None   # already over
    [scored] = p.add_request("s", [1], SamplingParams(), score_only=True)
    delta = p.process(TokenOutput("s", 0, [42], finish_reason="length"))
    assert delta.finish_reason == "length" and delta.text == "" and scored.token_ids == []
