"""`response_format` (OpenAI) and `structured_outputs` / `guided_*` (vLLM) -> an engine constraint."""
from __future__ import annotations

import json
from typing import Any

from engine.sampling_params import SamplingParamsError, StructuredOutputs
from launcher.server.errors import APIError, bad_request
from launcher.server.fields import Fields

# vLLM's older top-level extra parameters, still sent by many clients.
GUIDED_KEYS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
               "guided_grammar": "grammar"}


def read_constraint(f: Fields) -> StructuredOutputs | None:
    """The one constraint a request asks for, validated (a bad schema is a 400, not a failed request)."""
    response_format = f.dict("response_format")
    structured = f.dict("structured_outputs")
    guided = {key: f.raw(key) for key in GUIDED_KEYS if f.raw(key) is not None}
    given = [name for name, v in (("response_format", _is_constraint(response_format)),
                                  ("structured_outputs", bool(structured)), ("guided_*", bool(guided))) if v]
    if len(given) > 1:
        raise bad_request(f"give only one of {', '.join(given)}", given[1] if given[1] != "guided_*" else None)
    if response_format is not None:
        spec = _from_response_format(response_format)
    elif structured:
        spec = _from_vllm(structured, "structured_outputs")
    elif guided:
        spec = _from_vllm({GUIDED_KEYS[k]: v for k, v in guided.items()}, next(iter(guided)))
    else:
        return None
    if spec is not None:
        _validate(spec)
    return spec


def _is_constraint(response_format: dict | None) -> bool:
    return response_format is not None and response_format.get("type") != "text"


def _from_response_format(rf: dict) -> StructuredOutputs | None:
    kind = rf.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputs(json_object=True)
    if kind == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, dict):
            raise bad_request("'response_format.json_schema' must be an object with a 'schema'",
                              "response_format.json_schema")
        schema = spec.get("schema", {})
        if not isinstance(schema, (dict, bool)):
            raise bad_request("'response_format.json_schema.schema' must be a JSON schema object",
                              "response_format.json_schema.schema")
        return StructuredOutputs(json=json.dumps(schema))
    raise bad_request("'response_format.type' must be one of 'text', 'json_object', 'json_schema'",
                      "response_format.type")


def _from_vllm(raw: dict[str, Any], param: str) -> StructuredOutputs:
    known = {"json", "regex", "choice", "grammar", "json_object"}
    unknown = sorted(set(raw) - known - {"disable_fallback", "disable_any_whitespace",
                                         "disable_additional_properties", "whitespace_pattern"})
    if unknown:
        raise bad_request(f"'{param}' has unknown key(s) {', '.join(unknown)}; allowed: "
                          f"{', '.join(sorted(known))}", param)
    kwargs: dict[str, Any] = {}
    if raw.get("json") is not None:
        value = raw["json"]
        if isinstance(value, str):
            try:
                json.loads(value)
            except json.JSONDecodeError as e:
                raise bad_request(f"'{param}.json' is not valid JSON: {e}", param) from None
            kwargs["json"] = value
        elif isinstance(value, (dict, bool)):
            kwargs["json"] = json.dumps(value)
        else:
            raise bad_request(f"'{param}.json' must be a JSON schema object", param)
    if raw.get("regex") is not None:
        if not isinstance(raw["regex"], str):
            raise bad_request(f"'{param}.regex' must be a string", param)
        kwargs["regex"] = raw["regex"]
    if raw.get("choice") is not None:
        choice = raw["choice"]
        if not isinstance(choice, list) or not choice or not all(isinstance(c, str) for c in choice):
            raise bad_request(f"'{param}.choice' must be a non-empty list of strings", param)
        kwargs["choice"] = tuple(choice)
    if raw.get("grammar") is not None:
        if not isinstance(raw["grammar"], str):
            raise bad_request(f"'{param}.grammar' must be a string (a Lark grammar)", param)
        kwargs["grammar"] = raw["grammar"]
    if raw.get("json_object"):
        kwargs["json_object"] = True
    try:
        return StructuredOutputs(**kwargs)
    except SamplingParamsError as e:
        raise bad_request(str(e), param) from None


def _validate(spec: StructuredOutputs) -> None:
    from engine import structured
    if not structured.is_available():
        raise APIError(400, "structured outputs need the 'llguidance' package, which is not installed",
                       param="structured_outputs", code="not_supported")
    try:
        structured.validate(spec)
    except structured.StructuredOutputError as e:
        raise bad_request(f"invalid structured output constraint: {e}", "structured_outputs") from None
