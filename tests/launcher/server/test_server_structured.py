"""Structured outputs over HTTP: OpenAI response_format and vLLM structured_outputs / guided_* fields."""
import json
import re

import httpx
import pytest

from tests.launcher.server.conftest import PRIMARY

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer"}}}


def test_json_schema_response_format_validates(client):
    response = client.chat.completions.create(
        model=PRIMARY, temperature=0, max_tokens=60,
        messages=[{"role": "user", "content": "Describe a person as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
    person = json.loads(response.choices[0].message.content)
    assert set(person) == {"name", "age"} and isinstance(person["name"], str) and isinstance(person["age"], int)
    assert response.choices[0].finish_reason == "stop"


def test_json_object_response_format(client):
    response = client.chat.completions.create(
        model=PRIMARY, temperature=0, max_tokens=60, response_format={"type": "json_object"},
        messages=[{"role": "user", "content": 'Reply with the JSON object {"answer": "yes"} and nothing else.'}])
    assert isinstance(json.loads(response.choices[0].message.content), dict)


def test_choice_and_regex_through_extra_body(client):
    choices = ["Paris", "London", "Berlin"]
    for seed in range(3):
        response = client.chat.completions.create(
            model=PRIMARY, temperature=1.0, seed=seed, max_tokens=10,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            extra_body={"structured_outputs": {"choice": choices}})
        assert response.choices[0].message.content in choices
    completion = client.completions.create(model=PRIMARY, prompt="A phone number: ", temperature=0, max_tokens=20,
                                           extra_body={"guided_regex": r"[0-9]{3}-[0-9]{4}"})
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", completion.choices[0].text)


def test_streamed_structured_output(client):
    stream = client.chat.completions.create(
        model=PRIMARY, temperature=0, max_tokens=60, stream=True,
        messages=[{"role": "user", "content": "Describe a person as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert set(json.loads(text)) == {"name", "age"}


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "structured_outputs"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs"),
    ({"structured_outputs": {"colour": "red"}}, "structured_outputs"),
    ({"structured_outputs": {"choice": ["a"], "regex": "a"}}, "structured_outputs"),
])
def test_bad_constraints_are_400(server, body, param):
    payload = {"model": PRIMARY, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, **body}
    r = httpx.post(server.url + "/v1/chat/completions", json=payload, headers=server.auth, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
