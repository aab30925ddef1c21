"""Tool schemas at the API seam: checked up front, and turned into the constraint that tool_choice
'required' or a named function decodes under (vLLM's approach: guided decoding, not trust)."""
from __future__ import annotations

import json
from typing import Any

from engine.sampling_params import StructuredOutputs
from launcher.server.errors import APIError, bad_request

# lenient: keywords llguidance cannot enforce (not, if/then, uniqueItems, unknown formats) are valid JSON Schema,
# so they are skipped, not refused; broken schemas (bad types, dangling $refs, bad patterns) still fail.
_LENIENT = {"lenient": True}
# Compact JSON for forced calls: arguments without runs of spaces and newlines, and fewer tokens to generate.
_FORCED = {**_LENIENT, "whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_EMPTY_PARAMETERS = {"type": "object", "properties": {}}


def named_function(tool_choice: str | dict) -> str | None:
    """The function name when tool_choice names one, else None."""
    return tool_choice["function"]["name"] if isinstance(tool_choice, dict) else None


def parameters_of(tool: dict) -> dict:
    return tool["function"].get("parameters") or _EMPTY_PARAMETERS


def validate_tools(tools: list[dict] | None) -> None:
    """400 naming the tool when a parameters schema does not compile (when llguidance is there to say)."""
    if not tools or not _can_compile():
        return
    from engine import structured
    for i, tool in enumerate(tools):
        try:
            schema = {**parameters_of(tool), "x-guidance": _LENIENT}
            structured.validate(StructuredOutputs(json=json.dumps(schema)))
        except structured.StructuredOutputError as e:
            raise bad_request(f"'tools[{i}].function.parameters' is not a usable JSON schema: {e}",
                              f"tools[{i}].function.parameters") from None


def tool_choice_constraint(tools: list[dict] | None, tool_choice: str | dict,
                           parallel_tool_calls: bool = True) -> StructuredOutputs | None:
    """The JSON schema the answer must follow for tool_choice 'required' or a named function; None otherwise.

    'required': an array of one or more (at most one without parallel calls) {"name", "parameters"} objects,
    one alternative per tool with the name fixed, so each call's parameters follow that tool's schema.
    named: that function's parameters schema itself."""
    if not tools or tool_choice in ("none", "auto"):
        return None
    name = named_function(tool_choice)
    if name is not None:
        tool = next(t for t in tools if t["function"]["name"] == name)
        schema = {**parameters_of(tool)}
    else:
        defs: dict[str, Any] = {}
        alternatives = [_call_schema(t, defs) for t in tools]
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": alternatives}}
        if not parallel_tool_calls:
            schema["maxItems"] = 1
        if defs:
            schema["$defs"] = defs
    schema["x-guidance"] = _FORCED
    spec = StructuredOutputs(json=json.dumps(schema))
    if not _can_compile():
        raise APIError(400, f"tool_choice {tool_choice!r} needs constrained decoding, and the 'llguidance' "
                       "package is not installed", param="tool_choice", code="not_supported")
    from engine import structured
    try:
        structured.validate(spec)
    except structured.StructuredOutputError as e:
        raise bad_request(f"the tools cannot be enforced for this tool_choice: {e}", "tools") from None
    return spec


def _call_schema(tool: dict, defs: dict[str, Any]) -> dict:
    """{"name": <this tool>, "parameters": <its schema>}; its $defs move to the top, where '#/$defs/..'
    references resolve once the schema is nested."""
    params = _rewrite_refs(parameters_of(tool))
    for key in ("$defs", "definitions"):
        for def_name, definition in (params.pop(key, None) or {}).items():
            if defs.setdefault(def_name, definition) != definition:
                raise bad_request(f"two tools define '{def_name}' differently; 'required' tool_choice needs "
                                  "distinct $defs names", "tools")
    return {"type": "object", "additionalProperties": False, "required": ["name", "parameters"],
            "properties": {"name": {"const": tool["function"]["name"]}, "parameters": params}}


def _rewrite_refs(node: Any) -> Any:
    """A copy of a schema with draft-7 '#/definitions/..' references pointing at '#/$defs/..'."""
    if isinstance(node, dict):
        return {k: (v.replace("#/definitions/", "#/$defs/", 1) if k == "$ref" and isinstance(v, str)
                    else _rewrite_refs(v)) for k, v in node.items()}
    if isinstance(node, list):
        return [_rewrite_refs(v) for v in node]
    return node


def _can_compile() -> bool:
    from engine import structured
    return structured.is_available()
