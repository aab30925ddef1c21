"""Completions and chat through the official client: streaming shape, n, logprobs, stops, seeds, limits."""
from __future__ import annotations

import asyncio
import math

import httpx
import openai
import orjson
import pytest

from tests.launcher.server.conftest import MAX_MODEL_LEN, PRIMARY

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Name three colors."}]


def _greedy(client, **kw):
    return client.completions.create(model=PRIMARY, prompt=PROMPT, temperature=0, **kw)


def test_completion_basic_and_usage(client, hf_tokenizer):
    r = _greedy(client, max_tokens=8, extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == PRIMARY
    choice = r.choices[0]
    assert choice.finish_reason == "length" and choice.text
    assert r.usage.prompt_tokens == len(hf_tokenizer(PROMPT)["input_ids"])
    assert r.usage.completion_tokens == 8 and r.usage.total_tokens == r.usage.prompt_tokens + 8


def test_completion_streaming_equals_non_streaming(client):
    full = _greedy(client, max_tokens=12).choices[0]
    chunks = list(_greedy(client, max_tokens=12, stream=True, stream_options={"include_usage": True}))
    ids = {c.id for c in chunks}
    assert len(ids) == 1 and len({c.created for c in chunks}) == 1
    content = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in content) == full.text
    assert content[-1].choices[0].finish_reason == full.finish_reason
    assert all(c.usage is None for c in content)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_completion_prompt_shapes_and_n(client, hf_tokenizer):
    ids = hf_tokenizer(PROMPT)["input_ids"]
    by_text = _greedy(client, max_tokens=5).choices[0].text
    by_ids = client.completions.create(model=PRIMARY, prompt=ids, max_tokens=5, temperature=0).choices[0].text
    assert by_ids == by_text
    r = client.completions.create(model=PRIMARY, prompt=[PROMPT, "1, 2, 3,"], max_tokens=4, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text == _greedy(client, max_tokens=4).choices[0].text
    assert r.choices[2].text == r.choices[3].text != r.choices[0].text
    r = client.completions.create(model=PRIMARY, prompt=[ids, ids], max_tokens=3, temperature=0)
    assert len(r.choices) == 2 and r.choices[0].text == r.choices[1].text


def test_completion_echo(client):
    r = _greedy(client, max_tokens=4, echo=True)
    assert r.choices[0].text.startswith(PROMPT) and len(r.choices[0].text) > len(PROMPT)


def test_completion_logprobs(client):
    r = _greedy(client, max_tokens=6, logprobs=3, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and 3 <= len(top) <= 4
        assert math.isclose(max(top.values()), logprob, abs_tol=1e-5)   # greedy picks the most likely
        assert top[token] == logprob


def test_stop_strings(client):
    text = _greedy(client, max_tokens=16, extra_body={"ignore_eos": True}).choices[0].text
    assert len(text) > 6
    stop = text[3:6]
    r = _greedy(client, max_tokens=16, stop=[stop, "zzzz-never"]).choices[0]
    assert r.text == text[:text.index(stop)] and r.finish_reason == "stop"
    assert r.model_dump()["stop_reason"] == stop
    r = _greedy(client, max_tokens=16, stop=stop, extra_body={"include_stop_str_in_output": True}).choices[0]
    assert r.text == text[:text.index(stop) + len(stop)]
    streamed = "".join(c.choices[0].text for c in _greedy(client, max_tokens=16, stop=[stop], stream=True))
    assert streamed == text[:text.index(stop)]


def test_stop_token_ids(client, hf_tokenizer):
    text = _greedy(client, max_tokens=8).choices[0].text
    assert text.startswith(" Paris.")
    period = hf_tokenizer.convert_tokens_to_ids(".")
    r = _greedy(client, max_tokens=8, extra_body={"stop_token_ids": [period]})
    choice = r.choices[0]
    assert choice.text == " Paris" and choice.finish_reason == "stop"
    assert choice.model_dump()["stop_reason"] == period and r.usage.completion_tokens == 2
    kept = _greedy(client, max_tokens=8, extra_body={"stop_token_ids": [period], "include_stop_str_in_output": True})
    assert kept.choices[0].text == " Paris."


def test_vllm_extra_params_accepted(client):
    r = client.completions.create(
        model=PRIMARY, prompt=PROMPT, max_tokens=6, temperature=0.8, seed=7,
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "min_tokens": 6, "ignore_eos": True,
                    "skip_special_tokens": False})
    assert r.usage.completion_tokens == 6


def test_seed_reproducible_and_n(client):
    kw = dict(max_tokens=10, temperature=1.0, seed=1234, n=2)
    a = client.completions.create(model=PRIMARY, prompt=PROMPT, **kw)
    b = client.completions.create(model=PRIMARY, prompt=PROMPT, **kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert [c.index for c in a.choices] == [0, 1]


def test_chat_basic(client):
    r = client.chat.completions.create(model=PRIMARY, messages=CHAT, max_tokens=20, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    msg = r.choices[0].message
    assert msg.role == "assistant" and msg.content and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 20


def test_chat_streaming_shape(client):
    full = client.chat.completions.create(model=PRIMARY, messages=CHAT, max_tokens=15, temperature=0)
    chunks = list(client.chat.completions.create(model=PRIMARY, messages=CHAT, max_tokens=15, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c for c in chunks if c.choices]
    assert all(c.usage is None for c in content)
    text = "".join(c.choices[0].delta.content or "" for c in content)
    assert text == full.choices[0].message.content
    assert content[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == full.usage.total_tokens


def test_chat_raw_sse_framing(server):
    body = {"model": PRIMARY, "messages": CHAT, "max_tokens": 3, "stream": True}
    r = httpx.post(server.base_url + "/chat/completions", json=body, headers=server.auth, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = r.text.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for e in events[:-2]:
        assert e.startswith("data: ")
        assert orjson.loads(e[len("data: "):])["object"] == "chat.completion.chunk"
    # Without include_usage there is no usage chunk: every chunk has a choice.
    assert all(orjson.loads(e[6:])["choices"] for e in events[:-2])


def test_chat_n_and_logprobs(client):
    r = client.chat.completions.create(model=PRIMARY, messages=CHAT, max_tokens=5, temperature=0, n=2,
                                       logprobs=True, top_logprobs=2)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].message.content == r.choices[1].message.content
    for item in r.choices[0].logprobs.content:
        assert len(item.top_logprobs) == 2 and item.top_logprobs[0].token == item.token
        assert item.bytes == list(item.token.encode())
    assert "".join(t.token for t in r.choices[0].logprobs.content) == r.choices[0].message.content
    streamed = list(client.chat.completions.create(model=PRIMARY, messages=CHAT, max_tokens=5, temperature=0,
                                                   logprobs=True, stream=True))
    tokens = [t.token for c in streamed if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert tokens == [t.token for t in r.choices[0].logprobs.content]


def test_chat_stop_and_system_roles(client):
    messages = [{"role": "developer", "content": "Answer in one word."},
                {"role": "user", "content": [{"type": "text", "text": "Capital of France?"}]}]
    full = client.chat.completions.create(model=PRIMARY, messages=messages, max_tokens=12, temperature=0)
    text = full.choices[0].message.content
    assert len(text) >= 3
    r = client.chat.completions.create(model=PRIMARY, messages=messages, max_tokens=12, temperature=0,
                                       stop=[text[1:3]])
    assert r.choices[0].message.content == text[:text.index(text[1:3])] and r.choices[0].finish_reason == "stop"


def test_chat_multi_turn_with_tool_messages(client):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}}]
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18C and sunny"}]
    r = client.chat.completions.create(model=PRIMARY, messages=messages, tools=tools, max_tokens=8, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason in ("stop", "length",
                                                                                       "tool_calls")


def test_context_length_is_checked_not_truncated(client, server):
    with pytest.raises(openai.BadRequestError) as err:
        _greedy(client, max_tokens=MAX_MODEL_LEN)
    body = err.value.body
    assert body["code"] == "context_length_exceeded" and str(MAX_MODEL_LEN) in body["message"]
    assert "5 tokens in the prompt" in body["message"]
    long_prompt = "hello " * (MAX_MODEL_LEN + 10)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=PRIMARY, messages=[{"role": "user", "content": long_prompt}])
    assert err.value.body["code"] == "context_length_exceeded"
    # Chat without max_tokens gets the rest of the context: ok for a short prompt.
    r = client.chat.completions.create(model=PRIMARY, messages=CHAT, temperature=0, max_tokens=None,
                                       stop=["\n", "."])
    assert r.choices[0].finish_reason == "stop"


def test_async_client_concurrent(server):
    async def run():
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0) as c:
            calls = [c.chat.completions.create(model=PRIMARY, messages=[{"role": "user", "content": f"Say {i}"}],
                                               max_tokens=6, temperature=0) for i in range(4)]
            results = await asyncio.gather(*calls)
            stream = await c.completions.create(model=PRIMARY, prompt=PROMPT, max_tokens=4, temperature=0,
                                                stream=True)
            streamed = "".join([chunk.choices[0].text async for chunk in stream])
            return results, streamed

    results, streamed = asyncio.run(run())
    assert all(r.choices[0].message.content for r in results)
    assert len({r.id for r in results}) == 4
    assert streamed
