"""Malformed input: every case is a 4xx in OpenAI's error shape (never 422, never 500), and the server lives on."""
from __future__ import annotations

import httpx
import orjson
import pytest

from tests.launcher.server.conftest import MAX_BODY, MAX_MODEL_LEN, PRIMARY

CHAT = "/v1/chat/completions"
CMPL = "/v1/completions"
MSG = [{"role": "user", "content": "hi"}]


def chat(**kw):
    return {"model": PRIMARY, "messages": MSG, "max_tokens": 2, **kw}


def cmpl(**kw):
    return {"model": PRIMARY, "prompt": "hi", "max_tokens": 2, **kw}


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}

# (name, method, path, body (dict -> JSON, bytes -> raw), extra headers, status, param or None, code or None)
CASES = [
    ("bad-json", "POST", CHAT, b'{"model": ', {}, 400, None, None),
    ("not-an-object", "POST", CHAT, b"[1, 2]", {}, 400, None, None),
    ("empty-body", "POST", CHAT, b"", {}, 400, None, None),
    ("invalid-utf8", "POST", CHAT, b'{"model": "\xff\xfe", "messages": []}', {}, 400, None, None),
    ("json-null", "POST", CMPL, b"null", {}, 400, None, None),
    ("missing-model", "POST", CHAT, {"messages": MSG}, {}, 400, "model", None),
    ("model-not-string", "POST", CHAT, chat(model=5), {}, 400, "model", None),
    ("unknown-model-chat", "POST", CHAT, chat(model="nope/nope"), {}, 404, "model", "model_not_found"),
    ("unknown-model-cmpl", "POST", CMPL, cmpl(model="gpt-4"), {}, 404, "model", "model_not_found"),
    ("missing-messages", "POST", CHAT, {"model": PRIMARY}, {}, 400, "messages", None),
    ("empty-messages", "POST", CHAT, chat(messages=[]), {}, 400, "messages", None),
    ("messages-not-list", "POST", CHAT, chat(messages="hi"), {}, 400, "messages", None),
    ("message-not-object", "POST", CHAT, chat(messages=["hi"]), {}, 400, "messages[0]", None),
    ("invalid-role", "POST", CHAT, chat(messages=[{"role": "wizard", "content": "x"}]), {}, 400,
     "messages[0].role", None),
    ("missing-role", "POST", CHAT, chat(messages=[{"content": "x"}]), {}, 400, "messages[0].role", None),
    ("content-number", "POST", CHAT, chat(messages=[{"role": "user", "content": 42}]), {}, 400,
     "messages[0].content", None),
    ("user-content-null", "POST", CHAT, chat(messages=[{"role": "user", "content": None}]), {}, 400,
     "messages[0].content", None),
    ("bad-content-part", "POST", CHAT, chat(messages=[{"role": "user", "content": [{"type": "blob"}]}]), {}, 400,
     "messages[0].content[0].type", None),
    ("image-part", "POST", CHAT, chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]), {}, 400,
     "messages[0].content[0]", None),
    ("temperature-string", "POST", CHAT, chat(temperature="hot"), {}, 400, "temperature", None),
    ("temperature-negative", "POST", CHAT, chat(temperature=-1), {}, 400, "temperature", None),
    ("top-p-zero-ok-but-2", "POST", CHAT, chat(top_p=2), {}, 400, "top_p", None),
    ("top-k-minus-5", "POST", CHAT, chat(top_k=-5), {}, 400, "top_k", None),
    ("min-p-2", "POST", CMPL, cmpl(min_p=2), {}, 400, "min_p", None),
    ("rep-penalty-zero", "POST", CMPL, cmpl(repetition_penalty=0), {}, 400, "repetition_penalty", None),
    ("presence-penalty-big", "POST", CHAT, chat(presence_penalty=5), {}, 400, "presence_penalty", None),
    ("max-tokens-zero", "POST", CHAT, chat(max_tokens=0), {}, 400, "max_tokens", None),
    ("max-tokens-negative", "POST", CMPL, cmpl(max_tokens=-3), {}, 400, "max_tokens", None),
    ("max-tokens-string", "POST", CMPL, cmpl(max_tokens="10"), {}, 400, "max_tokens", None),
    ("max-tokens-bool", "POST", CMPL, cmpl(max_tokens=True), {}, 400, "max_tokens", None),
    ("max-tokens-huge", "POST", CMPL, cmpl(max_tokens=10**12), {}, 400, "prompt", "context_length_exceeded"),
    ("max-tokens-1e30", "POST", CHAT, chat(max_tokens=1e30), {}, 400, "messages", "context_length_exceeded"),
    ("n-zero", "POST", CHAT, chat(n=0), {}, 400, "n", None),
    ("n-huge", "POST", CHAT, chat(n=10**9), {}, 400, "n", None),
    ("n-float", "POST", CHAT, chat(n=1.5), {}, 400, "n", None),
    ("min-tokens-over-max", "POST", CMPL, cmpl(min_tokens=5, max_tokens=2), {}, 400, "min_tokens", None),
    ("seed-huge", "POST", CMPL, cmpl(seed=2**63), {}, 400, "seed", None),
    ("integer-beyond-64-bit", "POST", CMPL, b'{"model": "%s", "prompt": "x", "seed": 1180591620717411303424}'
     % PRIMARY.encode(), {}, 400, None, None),
    ("logprobs-cmpl-too-many", "POST", CMPL, cmpl(logprobs=50), {}, 400, "logprobs", None),
    ("logprobs-chat-int", "POST", CHAT, chat(logprobs=5), {}, 400, "logprobs", None),
    ("top-logprobs-without-logprobs", "POST", CHAT, chat(top_logprobs=2), {}, 400, "top_logprobs", None),
    ("top-logprobs-too-many", "POST", CHAT, chat(logprobs=True, top_logprobs=21), {}, 400, "top_logprobs", None),
    ("stop-number", "POST", CHAT, chat(stop=5), {}, 400, "stop", None),
    ("stop-mixed", "POST", CMPL, cmpl(stop=["a", 1]), {}, 400, "stop", None),
    ("stop-token-ids-out-of-vocab", "POST", CMPL, cmpl(stop_token_ids=[10**9]), {}, 400, "stop_token_ids", None),
    ("logit-bias-bad-key", "POST", CHAT, chat(logit_bias={"abc": 1}), {}, 400, "logit_bias", None),
    ("logit-bias-out-of-range", "POST", CHAT, chat(logit_bias={"5": 500}), {}, 400, "logit_bias", None),
    ("stream-not-bool", "POST", CHAT, chat(stream="yes"), {}, 400, "stream", None),
    ("stream-options-without-stream", "POST", CHAT, chat(stream_options={"include_usage": True}), {}, 400,
     "stream_options", None),
    ("stream-options-bad-type", "POST", CMPL, cmpl(stream=True, stream_options={"include_usage": "y"}), {}, 400,
     "stream_options.include_usage", None),
    ("suffix-refused", "POST", CMPL, cmpl(suffix="end"), {}, 400, "suffix", None),
    ("prompt-missing", "POST", CMPL, {"model": PRIMARY}, {}, 400, "prompt", None),
    ("prompt-empty-list", "POST", CMPL, cmpl(prompt=[]), {}, 400, "prompt", None),
    ("prompt-empty-string", "POST", CMPL, cmpl(prompt=""), {}, 400, "prompt", None),
    ("prompt-bad-token-id", "POST", CMPL, cmpl(prompt=[1, -4]), {}, 400, "prompt", None),
    ("prompt-nested-mixed", "POST", CMPL, cmpl(prompt=[[1, 2], "x"]), {}, 400, "prompt", None),
    ("prompt-dict", "POST", CMPL, cmpl(prompt={"text": "x"}), {}, 400, "prompt", None),
    ("oversize-prompt", "POST", CMPL, cmpl(prompt="hello " * (MAX_MODEL_LEN + 50)), {}, 400, "prompt",
     "context_length_exceeded"),
    ("oversize-body", "POST", CHAT, chat(messages=[{"role": "user", "content": "x" * (MAX_BODY + 10)}]), {}, 413,
     None, None),
    ("tools-not-list", "POST", CHAT, chat(tools={"type": "function"}), {}, 400, "tools", None),
    ("tool-missing-function", "POST", CHAT, chat(tools=[{"type": "function"}]), {}, 400, "tools[0].function", None),
    ("tool-bad-name", "POST", CHAT, chat(tools=[{"type": "function", "function": {"name": "has space"}}]), {}, 400,
     "tools[0].function.name", None),
    ("tool-bad-parameters", "POST", CHAT, chat(tools=[{"type": "function", "function": {
        "name": "f", "parameters": {"type": "string"}}}]), {}, 400, "tools[0].function.parameters", None),
    ("tool-choice-unknown-fn", "POST", CHAT, chat(tools=[TOOL], tool_choice={
        "type": "function", "function": {"name": "g"}}), {}, 400, "tool_choice", None),
    ("tool-choice-bad-string", "POST", CHAT, chat(tools=[TOOL], tool_choice="sometimes"), {}, 400, "tool_choice",
     None),
    ("tool-choice-required-no-tools", "POST", CHAT, chat(tool_choice="required"), {}, 400, "tool_choice", None),
    ("response-format-bad-type", "POST", CHAT, chat(response_format={"type": "xml"}), {}, 400,
     "response_format.type", None),
    ("functions-legacy", "POST", CHAT, chat(functions=[{"name": "f"}]), {}, 400, "functions", None),
    ("continue-final-needs-assistant", "POST", CHAT, chat(continue_final_message=True,
                                                          add_generation_prompt=False), {}, 400,
     "continue_final_message", None),
    ("tokenize-no-prompt", "POST", "/tokenize", {"text": "x"}, {}, 400, "prompt", None),
    ("detokenize-bad-ids", "POST", "/detokenize", {"tokens": ["a"]}, {}, 400, "tokens", None),
    ("detokenize-out-of-vocab", "POST", "/detokenize", {"tokens": [10**9]}, {}, 400, "tokens", None),
    ("unknown-route", "GET", "/v1/nothing-here", None, {}, 404, None, None),
    ("wrong-method", "GET", CHAT, None, {}, 405, None, None),
    ("delete-models", "DELETE", "/v1/models", None, {}, 405, None, None),
    ("no-key", "POST", CHAT, chat(), {"Authorization": ""}, 401, None, "invalid_api_key"),
    ("bad-scheme", "GET", "/v1/models", None, {"Authorization": "Basic dGVzdA=="}, 401, None, "invalid_api_key"),
    ("retrieve-unknown-model", "GET", "/v1/models/org/none", None, {}, 404, "model", "model_not_found"),
]


@pytest.mark.parametrize("name,method,path,body,headers,status,param,code", CASES, ids=[c[0] for c in CASES])
def test_malformed(server, name, method, path, body, headers, status, param, code):
    content = body if isinstance(body, bytes) else orjson.dumps(body) if body is not None else None
    all_headers = {**server.auth, "Content-Type": "application/json", **headers}
    all_headers = {k: v for k, v in all_headers.items() if v}
    r = httpx.request(method, server.url + path, content=content, headers=all_headers, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"] and error["type"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error


def test_suite_is_big_enough():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


def test_oversize_prompt_names_both_numbers(server):
    r = httpx.post(server.base_url + "/completions", headers=server.auth, timeout=60,
                   json=cmpl(prompt="hello " * (MAX_MODEL_LEN + 50), max_tokens=7))
    count = httpx.post(server.url + "/tokenize", json={"prompt": "hello " * (MAX_MODEL_LEN + 50)}).json()["count"]
    message = r.json()["error"]["message"]
    assert str(MAX_MODEL_LEN) in message and str(count) in message and "7" in message


def test_health_after_malformed_input(server):
    assert httpx.get(server.url + "/health").status_code == 200
    r = httpx.post(server.base_url + "/completions", headers=server.auth, json=cmpl(), timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] is not None
