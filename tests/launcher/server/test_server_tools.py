"""Tool calling over HTTP with the official client: tool_choice required / named / auto / none, streamed tool-call
deltas, parallel_tool_calls, a tool-result round trip, and 400s for bad tool requests."""
from __future__ import annotations

import json
import re

import httpx
import openai
import pytest

from tests.launcher.server.conftest import PRIMARY

pytest.importorskip("llguidance")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"type": "string", "maxLength": 20},
                                  "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers.",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["a", "b"],
                   "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 999},
                                  "b": {"type": "integer", "minimum": 0, "maximum": 999}}}}}
TOOLS = [WEATHER, ADD]
ASK = [{"role": "user", "content": "What is the weather in Paris? Use the tools."}]
CALL_ID = re.compile(r"^call_[A-Za-z0-9]{24}$")
# Forces a Hermes block through structured outputs, so 'auto' parsing is exercised end to end whatever the model.
HERMES_REGEX = (r'<tool_call>\{"name": "get_weather", "arguments": '
                r'\{"city": "[A-Z][a-z]{2,9}", "unit": "celsius"\}\}</tool_call>')


def check_call(name: str, arguments: str) -> dict:
    """The call names an offered tool and its arguments are a JSON object that fits that tool's schema."""
    tool = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}[name]
    args = json.loads(arguments)
    assert isinstance(args, dict) and set(tool["required"]) <= set(args) <= set(tool["properties"]), args
    for key, value in args.items():
        spec = tool["properties"][key]
        assert isinstance(value, {"string": str, "integer": int}[spec["type"]]) and not isinstance(value, bool)
        if "enum" in spec:
            assert value in spec["enum"]
        if spec["type"] == "integer":
            assert spec["minimum"] <= value <= spec["maximum"]
    return args


def create(client, **kwargs):
    return client.chat.completions.create(**{"model": PRIMARY, "messages": ASK, "tools": TOOLS, "max_tokens": 200,
                                             "temperature": 0, **kwargs})


def test_required_yields_valid_calls(client):
    for seed, extra in ((None, {}), (1, {"temperature": 1.0}), (2, {"temperature": 1.0, "parallel_tool_calls": False})):
        response = create(client, tool_choice="required", seed=seed, **extra)
        choice = response.choices[0]
        calls = choice.message.tool_calls
        assert calls and choice.finish_reason == "tool_calls", choice
        if extra.get("parallel_tool_calls") is False:
            assert len(calls) == 1
        for call in calls:
            assert CALL_ID.match(call.id) and call.type == "function"
            check_call(call.function.name, call.function.arguments)
        assert len({c.id for c in calls}) == len(calls)


def test_named_function_yields_one_call(client):
    for name in ("add", "get_weather"):
        response = create(client, tool_choice={"type": "function", "function": {"name": name}})
        choice = response.choices[0]
        (call,) = choice.message.tool_calls
        assert call.function.name == name and CALL_ID.match(call.id)
        check_call(name, call.function.arguments)
        assert choice.finish_reason == "stop" and not choice.message.content   # as OpenAI answers a forced call


def collect_stream(stream) -> tuple[dict[int, dict], str, list[str | None], set]:
    """Merge streamed tool-call deltas, checking OpenAI's rules: id, type and name only in the first delta of
    each call (with its index), arguments after."""
    calls: dict[int, dict] = {}
    content, finish, ids = "", [], set()
    for chunk in stream:
        ids.add((chunk.id, chunk.created))
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        finish.append(choice.finish_reason)
        content += choice.delta.content or ""
        for piece in choice.delta.tool_calls or []:
            if piece.index not in calls:
                assert piece.index == len(calls) and CALL_ID.match(piece.id) and piece.type == "function"
                assert piece.function.name and piece.function.arguments == ""
                calls[piece.index] = {"id": piece.id, "name": piece.function.name, "arguments": ""}
            else:
                assert piece.id is None and piece.function.name is None and piece.function.arguments
                calls[piece.index]["arguments"] += piece.function.arguments
    return calls, content, finish, ids


@pytest.mark.parametrize("tool_choice, finish_reason", [
    ("required", "tool_calls"), ({"type": "function", "function": {"name": "get_weather"}}, "stop")])
def test_streamed_tool_call_deltas(client, tool_choice, finish_reason):
    calls, content, finish, ids = collect_stream(create(client, tool_choice=tool_choice, stream=True))
    assert calls and content == "" and len(ids) == 1
    assert [f for f in finish if f] == [finish_reason] and finish[-1] == finish_reason
    for call in calls.values():
        check_call(call["name"], call["arguments"])
    # Greedy, so the streamed calls are the non-streamed ones.
    whole = create(client, tool_choice=tool_choice).choices[0].message.tool_calls
    assert [(c.function.name, json.loads(c.function.arguments)) for c in whole] == \
        [(c["name"], json.loads(c["arguments"])) for c in calls.values()]


def test_auto_parses_hermes_blocks(client):
    body = {"tool_choice": "auto", "extra_body": {"structured_outputs": {"regex": HERMES_REGEX}}}
    choice = create(client, **body).choices[0]
    (call,) = choice.message.tool_calls
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert call.function.name == "get_weather" and check_call("get_weather", call.function.arguments)
    calls, content, finish, _ = collect_stream(create(client, stream=True, **body))
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [("get_weather", call.function.arguments)]
    assert content == "" and finish[-1] == "tool_calls"
    # tool_choice 'none': the same text stays content.
    none = create(client, **{**body, "tool_choice": "none"}).choices[0]
    assert none.message.tool_calls is None and none.finish_reason == "stop"
    assert re.fullmatch(HERMES_REGEX, none.message.content)


def test_tool_choice_none_returns_content(client):
    choice = create(client, tool_choice="none", max_tokens=20).choices[0]
    assert choice.message.tool_calls is None and isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason in ("stop", "length")


def test_tool_result_round_trip(client, server):
    first = create(client, tool_choice={"type": "function", "function": {"name": "get_weather"}}).choices[0]
    call = first.message.tool_calls[0]
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny and 22 degrees celsius."}]
    answer = create(client, messages=messages, tool_choice="none", max_tokens=30).choices[0]
    assert answer.message.content and answer.message.tool_calls is None
    rendered = httpx.post(server.url + "/tokenize", headers=server.auth, timeout=30,
                          json={"model": PRIMARY, "messages": messages, "tools": TOOLS}).json()
    text = httpx.post(server.url + "/detokenize", headers=server.auth, timeout=30,
                      json={"tokens": rendered["tokens"]}).json()["prompt"]
    assert "Sunny and 22 degrees celsius." in text and text.rstrip().endswith("assistant")


@pytest.mark.parametrize("extra, param", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "banana"}}}}}]}, "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"$ref": "#/$defs/missing"}}}}}]}, "tools[0].function.parameters"),
    ({"tool_choice": {"type": "function", "function": {"name": "launch"}}}, "tool_choice"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [], "tool_choice": "required"}, "tool_choice"),
])
def test_bad_tool_requests_are_400(server, extra, param):
    payload = {"model": PRIMARY, "messages": ASK, "max_tokens": 5, "tools": TOOLS, **extra}
    r = httpx.post(server.url + "/v1/chat/completions", json=payload, headers=server.auth, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error


def test_unknown_named_tool_through_client(client):
    with pytest.raises(openai.BadRequestError) as e:
        create(client, tool_choice={"type": "function", "function": {"name": "launch"}})
    assert e.value.status_code == 400 and "launch" in e.value.message


def rendered_prompt(server, **body) -> str:
    ids = httpx.post(server.url + "/tokenize", headers=server.auth, timeout=30,
                     json={"model": PRIMARY, **body}).json()["tokens"]
    return httpx.post(server.url + "/detokenize", headers=server.auth, timeout=30, json={"tokens": ids}).json()["prompt"]


def test_tools_reach_a_template_that_ignores_them(server):
    """SmolLM2's template never reads `tools`: the functions go into a system turn, Hermes style, and past calls
    and results into text, so under tool_choice 'auto' the model can see what it may call."""
    call = {"id": "call_" + "a" * 24, "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}
    messages = ASK + [{"role": "assistant", "content": None, "tool_calls": [call]},
                      {"role": "tool", "tool_call_id": call["id"], "content": "Sunny, 22 C."}]
    text = rendered_prompt(server, messages=messages, tools=TOOLS)
    assert text.startswith("<|im_start|>system\nYou may call functions")
    assert '"name": "get_weather"' in text and '"name": "add"' in text and "<tool_call>" in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>' in text
    assert "<|im_start|>user\n<tool_response>\nSunny, 22 C.\n</tool_response><|im_end|>" in text
    plain = rendered_prompt(server, messages=ASK)
    assert "You may call functions" not in plain and "SmolLM" in plain   # no tools: the template's own system turn
