"""The Responses API over HTTP with the official client: text equal to chat's, the typed stream in OpenAI's order,
a function-tool round trip, text.format json_schema, previous_response_id, background + cancel (KV freed),
max_output_tokens -> incomplete, GET / DELETE / input_items, and OpenAI-shaped 4xx for bad requests."""
from __future__ import annotations

import json
import re
import time

import httpx
import openai
import pytest

from tests.launcher.server.conftest import PRIMARY

pytest.importorskip("llguidance")

ASK = "What is the capital of France?"
WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather in a city.", "strict": True,
           "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                          "properties": {"city": {"type": "string", "maxLength": 20}}}}
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer"}}}
RESP_ID = re.compile(r"^resp_[0-9a-f]{48}$")


def create(client, **kwargs):
    return client.responses.create(**{"model": PRIMARY, "temperature": 0, "max_output_tokens": 24, **kwargs})


def _gauge(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics").text
    return float(re.search(rf"^{name}\{{[^}}]*\}} (\S+)$", text, re.M).group(1))


def _healthy(server) -> None:
    assert httpx.get(server.url + "/health/ready").status_code == 200


def test_text_equals_chat_completion(client):
    response = create(client, input=ASK, instructions="Answer briefly.", metadata={"k": "v"}, user="u1")
    chat = client.chat.completions.create(model=PRIMARY, temperature=0, max_tokens=24, messages=[
        {"role": "system", "content": "Answer briefly."}, {"role": "user", "content": ASK}])
    assert RESP_ID.match(response.id) and response.object == "response" and response.model == PRIMARY
    (message,) = response.output
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    (part,) = message.content
    assert part.type == "output_text" and part.annotations == []
    assert response.output_text == chat.choices[0].message.content
    assert response.status == ("incomplete" if chat.choices[0].finish_reason == "length" else "completed")
    usage = response.usage
    assert usage.input_tokens == chat.usage.prompt_tokens and usage.output_tokens == chat.usage.completion_tokens
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.output_tokens_details.reasoning_tokens == 0 and usage.input_tokens_details.cached_tokens >= 0
    assert response.metadata == {"k": "v"} and response.user == "u1" and response.instructions == "Answer briefly."
    assert response.temperature == 0 and response.error is None and response.store is True
    # the same through a message list with text parts
    listed = create(client, instructions="Answer briefly.",
                    input=[{"role": "user", "content": [{"type": "input_text", "text": ASK}]}])
    assert listed.output_text == response.output_text


# OpenAI's order for one text message (https://platform.openai.com/docs/api-reference/responses-streaming).
TEXT_EVENTS = ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
               "response.output_text.delta", "response.output_text.done", "response.content_part.done",
               "response.output_item.done"]


def _collapse(types: list[str]) -> list[str]:
    return [t for i, t in enumerate(types) if i == 0 or t != types[i - 1]]


def test_stream_events_in_openai_order(client):
    with client.responses.stream(model=PRIMARY, input=ASK, temperature=0, max_output_tokens=24,
                                 include=["message.output_text.logprobs"], top_logprobs=2) as stream:
        events = list(stream)
        final = stream.get_final_response()
    types = [e.type for e in events]
    end = "response.incomplete" if final.status == "incomplete" else "response.completed"
    assert final.status in ("completed",) or end == "response.incomplete"
    assert _collapse(types) == TEXT_EVENTS + [end], types
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    text = "".join(e.delta for e in deltas)
    done = next(e for e in events if e.type == "response.output_text.done")
    item_id = events[2].item.id
    assert all(e.item_id == item_id and e.output_index == 0 and e.content_index == 0 for e in deltas)
    assert text == done.text == final.output_text and text
    assert len({e.response.id for e in events if hasattr(e, "response")}) == 1
    # logprobs: one per generated token, with the asked-for alternatives, equal streamed and in the final part
    part = final.output[0].content[0]
    assert len(part.logprobs) == final.usage.output_tokens
    assert all(len(lp.top_logprobs) == 2 for lp in part.logprobs)
    assert sum(len(e.logprobs) for e in deltas) == len(part.logprobs)
    # not streamed, the same answer
    again = create(client, input=ASK, include=["message.output_text.logprobs"], top_logprobs=2)
    assert again.output_text == text
    assert [lp.token for lp in again.output[0].content[0].logprobs] == [lp.token for lp in part.logprobs]


def test_function_call_round_trip(client):
    forced = {"type": "function", "name": "get_weather"}
    first = create(client, input="What is the weather in Paris?", tools=[WEATHER], tool_choice=forced,
                   max_output_tokens=40)
    (call,) = first.output
    assert call.type == "function_call" and call.name == "get_weather" and call.status == "completed"
    assert call.id.startswith("fc_") and re.match(r"^call_[A-Za-z0-9]{24}$", call.call_id)
    args = json.loads(call.arguments)
    assert set(args) == {"city"} and isinstance(args["city"], str)
    assert first.tool_choice.name == "get_weather" and first.tools[0].name == "get_weather"
    result = {"type": "function_call_output", "call_id": call.call_id, "output": '{"temperature_c": 21}'}
    # continued from the stored response, and with the whole conversation given again: the same prompt
    cont = create(client, previous_response_id=first.id, input=[result], tools=[WEATHER])
    full = create(client, input=[{"role": "user", "content": "What is the weather in Paris?"},
                                 call.model_dump(exclude_none=True), result], tools=[WEATHER])
    for answer in (cont, full):
        assert answer.output[-1].type in ("message", "function_call")
    assert cont.usage.input_tokens == full.usage.input_tokens > first.usage.input_tokens
    assert cont.output_text == full.output_text
    assert cont.previous_response_id == first.id


def test_streamed_function_call(client):
    with client.responses.stream(model=PRIMARY, input="Weather in Rome?", tools=[WEATHER], temperature=0,
                                 tool_choice={"type": "function", "name": "get_weather"},
                                 max_output_tokens=40) as stream:
        events = list(stream)
        final = stream.get_final_response()
    types = _collapse([e.type for e in events])
    assert types == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.function_call_arguments.delta", "response.function_call_arguments.done",
                     "response.output_item.done", "response.completed"], types
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    (call,) = final.output
    assert call.arguments == args and json.loads(args)["city"]


def test_json_schema_format(client):
    response = create(client, input="Describe a person as JSON.", max_output_tokens=60,
                      text={"format": {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}})
    person = json.loads(response.output_text)
    assert set(person) == {"name", "age"} and isinstance(person["name"], str) and isinstance(person["age"], int)
    assert response.text.format.type == "json_schema" and response.text.format.name == "person"
    as_object = create(client, input='Reply with the JSON object {"answer": "yes"}.', max_output_tokens=40,
                       text={"format": {"type": "json_object"}})
    assert isinstance(json.loads(as_object.output_text), dict)


def test_previous_response_id_continues(client):
    first = create(client, input="My name is Ada. Say hi.", max_output_tokens=16)
    second = create(client, input="What is my name?", previous_response_id=first.id, max_output_tokens=16)
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    # the same conversation given in full renders the same prompt
    full = create(client, max_output_tokens=16, input=[
        {"role": "user", "content": "My name is Ada. Say hi."},
        {"role": "assistant", "content": first.output_text}, {"role": "user", "content": "What is my name?"}])
    assert full.usage.input_tokens == second.usage.input_tokens and full.output_text == second.output_text
    items = client.responses.input_items.list(second.id, order="asc")
    assert [i.type for i in items.data] == ["message"] and items.data[0].content[0].text == "What is my name?"


def test_background_cancel_frees_kv(client, server):
    response = create(client, input="Write a very long story.", background=True, max_output_tokens=1500,
                      temperature=0.7, extra_body={"ignore_eos": True})
    assert response.status in ("queued", "in_progress") and response.background is True
    deadline = time.monotonic() + 120   # margins that hold on a loaded machine
    while _gauge(server, "llm:num_requests_running") == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.responses.retrieve(response.id).status == "in_progress"
    cancelled = client.responses.cancel(response.id)
    assert cancelled.status == "cancelled"
    assert client.responses.retrieve(response.id).status == "cancelled"
    deadline = time.monotonic() + 60
    while (_gauge(server, "llm:num_requests_running"), _gauge(server, "llm:kv_cache_blocks_used")) != (0, 0):
        assert time.monotonic() < deadline, "the cancelled request still holds the engine"
        time.sleep(0.1)
    # a background response that runs to the end
    short = create(client, input=ASK, background=True, max_output_tokens=8)
    deadline = time.monotonic() + 120
    while (got := client.responses.retrieve(short.id)).status in ("queued", "in_progress"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert got.status in ("completed", "incomplete") and got.output_text
    with pytest.raises(openai.BadRequestError):   # only background responses can be cancelled
        client.responses.cancel(create(client, input=ASK, max_output_tokens=4).id)


def test_max_output_tokens_incomplete(client):
    response = create(client, input="Write a long story about a dragon.", max_output_tokens=5,
                      extra_body={"ignore_eos": True})
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 5 and response.output[0].status == "incomplete"
    with client.responses.stream(model=PRIMARY, input="Write a long story.", max_output_tokens=5,
                                 extra_body={"ignore_eos": True}) as stream:
        events = list(stream)
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"


def test_get_delete(client, server):
    response = create(client, input=ASK, max_output_tokens=8)
    got = client.responses.retrieve(response.id)
    assert got.id == response.id and got.output_text == response.output_text
    deleted = httpx.delete(f"{server.base_url}/responses/{response.id}", headers=server.auth)
    assert deleted.status_code == 200 and deleted.json() == {"id": response.id, "object": "response", "deleted": True}
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)
    unstored = create(client, input=ASK, max_output_tokens=4, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


@pytest.mark.parametrize("body, status, param", [
    ({"input": [{"type": "computer_call", "id": "x"}]}, 400, "input[0].type"),
    ({"input": "hi", "previous_response_id": "resp_nope"}, 404, "previous_response_id"),
    ({"input": 7}, 400, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, 400, "input"),
    ({"input": [{"role": "wizard", "content": "hi"}]}, 400, "input[0].role"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, 400, "input[0].call_id"),
    ({"input": "hi", "max_output_tokens": "ten"}, 400, "max_output_tokens"),
    ({"input": "hi", "temperature": "hot"}, 400, "temperature"),
    ({"input": "hi", "tools": [{"type": "web_search"}]}, 400, "tools[0].type"),
    ({"input": "hi", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, 400, "tool_choice"),
    ({"input": "hi", "text": {"format": {"type": "yaml"}}}, 400, "text.format.type"),
    ({"input": "hi", "include": ["file_search_call.results"]}, 400, "include[0]"),
    ({"input": "hi", "background": True, "store": False}, 400, "background"),
    ({"input": "hi", "metadata": {"k": 1}}, 400, "metadata.k"),
    ({}, 400, "input"),
])
def test_bad_requests_are_openai_shaped(server, body, status, param):
    r = httpx.post(server.base_url + "/responses", json={"model": PRIMARY, **body}, headers=server.auth)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param and error["message"]
    _healthy(server)


def test_unknown_response_ids_are_404(server):
    for method, path in (("GET", ""), ("DELETE", ""), ("POST", "/cancel"), ("GET", "/input_items")):
        r = httpx.request(method, f"{server.base_url}/responses/resp_missing{path}", headers=server.auth)
        assert r.status_code == 404 and r.json()["error"]["message"], (method, path, r.text)
    _healthy(server)


def test_routes_documented_and_preflighted(server):
    paths = httpx.get(server.url + "/openapi.json").json()["paths"]
    assert {"post"} <= set(paths["/v1/responses"]) and {"get", "delete"} <= set(paths["/v1/responses/{response_id}"])
    assert "/v1/responses/{response_id}/cancel" in paths and "/v1/responses/{response_id}/input_items" in paths
    r = httpx.options(server.base_url + "/responses/resp_x", headers={
        "Origin": "http://allowed.example", "Access-Control-Request-Method": "DELETE"})
    assert r.status_code == 204 and "DELETE" in r.headers["access-control-allow-methods"]


def test_store_is_bounded_and_persists(tmp_path):
    from launcher.server.response_store import ResponseStore, StoredResponse

    def record(i: int, status: str = "completed") -> StoredResponse:
        return StoredResponse({"id": f"resp_{i}", "status": status}, [{"id": f"msg_{i}"}], [{"id": f"msg_{i}"}])

    store = ResponseStore(2, tmp_path)
    for r in (record(0, "in_progress"), record(1), record(2)):
        store.put(r)
    # the least recently used finished one goes; a running one stays (and is not written: it cannot resume)
    assert store.get("resp_1") is None and store.get("resp_0") and store.get("resp_2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resp_2.json"]
    store.put(record(3))
    store.put(record(4))
    assert len(store) == 2 and store.get("resp_0") and store.get("resp_4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resp_4.json"]
    again = ResponseStore(2, tmp_path)   # a restart reads the finished ones back
    assert again.get("resp_4").history == [{"id": "msg_4"}] and len(again) == 1
    again.delete("resp_4")
    assert not (tmp_path / "resp_4.json").exists()


def test_upstream_models_are_refused_not_proxied():
    import asyncio

    from launcher.server.errors import APIError
    from launcher.server.settings import UpstreamSettings
    from launcher.server.upstream import Upstream, UpstreamModel

    upstream = Upstream(UpstreamSettings(name="lab", engine="vllm", base_url="http://127.0.0.1:9/v1"))
    with pytest.raises(APIError) as e:   # refused before anything is sent
        asyncio.run(upstream.proxy(None, "responses", {"model": "m"}, UpstreamModel("lab/m", "m"), False))
    assert e.value.status == 400 and e.value.code == "model_not_supported"
