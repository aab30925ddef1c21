"""Responses API request parsing: input items, tools, tool_choice and text.format validated into a
ResponsesRequest, which turns into the chat body the chat path parses (one sampling / tools / structured seam)."""
from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from launcher.server.errors import bad_request
from launcher.server.fields import Fields
from launcher.server.protocol import MAX_LOGPROBS, model_field
from launcher.server.protocol_chat import tool_choice_mode

LOGPROBS_INCLUDE = "message.output_text.logprobs"
_INCLUDABLE = (LOGPROBS_INCLUDE, "reasoning.encrypted_content")   # the second is accepted: we make no reasoning
_MESSAGE_ROLES = ("user", "assistant", "system", "developer")
_TEXT_PARTS = ("input_text", "output_text", "text")
_MEDIA_PARTS = ("input_file", "input_audio")
# vLLM's extra sampling parameters (and OpenAI's that the chat path reads), passed to the chat parser as given.
_PASSTHROUGH = ("temperature", "top_p", "seed", "stop", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                "frequency_penalty", "ignore_eos", "min_tokens", "stop_token_ids", "skip_special_tokens",
                "include_stop_str_in_output", "logit_bias", "structured_outputs", "chat_template_kwargs")
_REFUSED = {"conversation": "'conversation' objects are not supported: use 'previous_response_id'",
            "prompt": "prompt templates ('prompt') are not supported", "n": "'n' is not a Responses parameter"}


def new_item_id(prefix: str) -> str:
    """OpenAI's id shape: a type prefix ('resp', 'msg', 'fc', 'fco'), '_', 48 hex digits."""
    return f"{prefix}_{secrets.token_hex(24)}"


@dataclass(frozen=True, slots=True)
class ResponsesRequest:
    model: str
    input_items: list[dict]              # normalized items (message / function_call / function_call_output), ids set
    instructions: str | None
    max_output_tokens: int | None
    tools: list[dict]                    # Responses' flat shape, normalized
    tool_choice: str | dict              # 'auto' | 'none' | 'required' | {"type": "function", "name"}
    parallel_tool_calls: bool
    text_format: dict                    # {"type": "text"} | {"type": "json_object"} | {"type": "json_schema", ...}
    want_logprobs: bool
    top_logprobs: int | None
    previous_response_id: str | None
    store: bool
    background: bool
    stream: bool
    metadata: dict[str, str]
    user: str | None
    passthrough: dict                    # sampling fields for the chat parser, as given

    def chat_body(self, messages: list[dict]) -> dict:
        """The chat completion this response runs: the chat parser validates sampling, tools and the format."""
        body: dict[str, Any] = {**self.passthrough, "model": self.model, "messages": messages,
                                "max_tokens": self.max_output_tokens, "parallel_tool_calls": self.parallel_tool_calls}
        if self.tools:
            body["tools"] = [{"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters")
                                                               if t.get(k) is not None}} for t in self.tools]
            body["tool_choice"] = self.tool_choice if isinstance(self.tool_choice, str) else \
                {"type": "function", "function": {"name": self.tool_choice["name"]}}
        if self.text_format["type"] == "json_object":
            body["response_format"] = {"type": "json_object"}
        elif self.text_format["type"] == "json_schema":
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": self.text_format.get("name") or "response", "schema": self.text_format["schema"],
                "strict": self.text_format.get("strict")}}
        if self.want_logprobs:
            body["logprobs"] = True
            body["top_logprobs"] = self.top_logprobs
        return body


def parse_responses_request(body: dict) -> ResponsesRequest:
    f = Fields(body)
    model = model_field(f)
    for key, message in _REFUSED.items():
        if f.has(key):
            raise bad_request(message, key)
    store = bool(f.bool("store", True))
    background = bool(f.bool("background", False))
    stream = bool(f.bool("stream", False))
    if background and not store:
        raise bad_request("'background' requires 'store' to be true", "background")
    if background and stream:
        raise bad_request("'background' with 'stream' is not supported by this server: poll GET "
                          "/v1/responses/{id} instead", "stream")
    include = f.list("include") or []
    for i, name in enumerate(include):
        if name not in _INCLUDABLE:
            raise bad_request(f"'include[{i}]' must be one of {', '.join(_INCLUDABLE)}, got {name!r}",
                              f"include[{i}]")
    tools = _tools(f.list("tools"))
    previous = f.str("previous_response_id")
    input_items = read_input(f.raw("input"), allow_empty=previous is not None)
    return ResponsesRequest(
        model=model, input_items=input_items, instructions=f.str("instructions"),
        max_output_tokens=f.int("max_output_tokens", lo=1), tools=tools,
        tool_choice=_tool_choice(f.raw("tool_choice"), tools),
        parallel_tool_calls=bool(f.bool("parallel_tool_calls", True)), text_format=_text_format(f.dict("text")),
        want_logprobs=LOGPROBS_INCLUDE in include, top_logprobs=f.int("top_logprobs", lo=0, hi=MAX_LOGPROBS),
        previous_response_id=previous, store=store, background=background, stream=stream,
        metadata=_metadata(f.dict("metadata")), user=f.str("user"),
        passthrough={k: body[k] for k in _PASSTHROUGH if body.get(k) is not None})


def read_input(raw: Any, allow_empty: bool = False) -> list[dict]:
    """`input`: a string (one user message) or a list of items, each normalized with an id."""
    if raw is None:
        if allow_empty:
            return []
        raise bad_request("'input' is required", "input")
    if isinstance(raw, str):
        return [_message({"role": "user", "content": raw}, "input")]
    if not isinstance(raw, list):
        raise bad_request("'input' must be a string or an array of items", "input")
    if not raw and not allow_empty:
        raise bad_request("'input' must hold at least one item", "input")
    return [_item(item, f"input[{i}]") for i, item in enumerate(raw)]


def _item(raw: Any, where: str) -> dict:
    if not isinstance(raw, dict):
        raise bad_request(f"'{where}' must be an object", where)
    kind = raw.get("type", "message")
    if kind == "message":
        return _message(raw, where)
    f = Fields(raw, where + ".")
    if kind == "function_call":
        call_id, name, arguments = _required_str(f, "call_id"), _required_str(f, "name"), f.str("arguments", "{}")
        return {"type": "function_call", "id": f.str("id") or new_item_id("fc"), "call_id": call_id, "name": name,
                "arguments": arguments, "status": "completed"}
    if kind == "function_call_output":
        call_id = _required_str(f, "call_id")
        output = raw.get("output")
        if isinstance(output, list):
            output = "".join(_part_text(p, f"{where}.output[{j}]") for j, p in enumerate(output))
        if not isinstance(output, str):
            raise bad_request(f"'{where}.output' must be a string or an array of text parts", f"{where}.output")
        return {"type": "function_call_output", "id": f.str("id") or new_item_id("fco"), "call_id": call_id,
                "output": output, "status": "completed"}
    raise bad_request(f"'{where}.type' must be 'message', 'function_call' or 'function_call_output' (the item "
                      f"types this server supports), got {kind!r}", f"{where}.type", code="unsupported_item_type")


def _message(raw: dict, where: str) -> dict:
    role = raw.get("role")
    if role not in _MESSAGE_ROLES:
        raise bad_request(f"'{where}.role' must be one of {', '.join(_MESSAGE_ROLES)}, got {role!r}", f"{where}.role")
    content = raw.get("content")
    part_type = "output_text" if role == "assistant" else "input_text"
    if isinstance(content, str):
        parts = [{"type": part_type, "text": content}]
    elif isinstance(content, list):
        parts = [_input_image(p, f"{where}.content[{j}]") if isinstance(p, dict) and p.get("type") == "input_image"
                 else {"type": part_type, "text": _part_text(p, f"{where}.content[{j}]")}
                 for j, p in enumerate(content)]
    else:
        raise bad_request(f"'{where}.content' must be a string or an array of content parts", f"{where}.content")
    item_id = raw.get("id")
    if item_id is not None and not isinstance(item_id, str):
        raise bad_request(f"'{where}.id' must be a string", f"{where}.id")
    return {"type": "message", "id": item_id or new_item_id("msg"), "role": role, "status": "completed",
            "content": parts}


def _input_image(part: dict, where: str) -> dict:
    """{"type": "input_image", "image_url": "...", "detail": ...}, kept as given (it is stored and listed)."""
    if part.get("file_id") is not None:
        raise bad_request(f"'{where}.file_id': uploaded files are not supported; give 'image_url'", f"{where}.file_id")
    url = part.get("image_url")
    if not isinstance(url, str) or not url:
        raise bad_request(f"'{where}.image_url' must be a string (a data:, file:// or http(s) URL)",
                          f"{where}.image_url")
    return {"type": "input_image", "image_url": url, "detail": part.get("detail", "auto")}


def _part_text(part: Any, where: str) -> str:
    if not isinstance(part, dict):
        raise bad_request(f"'{where}' must be an object", where)
    kind = part.get("type")
    if kind == "refusal" and isinstance(part.get("refusal"), str):
        return part["refusal"]
    if kind in _MEDIA_PARTS:
        raise bad_request(f"'{where}': this model accepts text only, not {kind!r} parts", f"{where}.type")
    if kind not in _TEXT_PARTS:
        raise bad_request(f"'{where}.type' must be 'input_text' or 'output_text', got {kind!r}", f"{where}.type")
    if not isinstance(part.get("text"), str):
        raise bad_request(f"'{where}.text' must be a string", f"{where}.text")
    return part["text"]


def _required_str(f: Fields, key: str) -> str:
    if not f.has(key):
        raise bad_request(f"'{f.name(key)}' is required", f.name(key))
    return f.str(key)


def items_to_messages(instructions: str | None, items: list[dict]) -> list[dict]:
    """Chat messages for the conversation: instructions as the system turn, function calls as assistant
    tool_calls (calls in a row, and the text right before them, are one assistant turn), outputs as tool turns."""
    messages: list[dict] = [{"role": "system", "content": instructions}] if instructions is not None else []
    for item in items:
        if item["type"] == "message":
            messages.append({"role": item["role"], "content": [
                {"type": "image_url", "image_url": {"url": p["image_url"]}} if p["type"] == "input_image"
                else {"type": "text", "text": p["text"]} for p in item["content"]]})
        elif item["type"] == "function_call":
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]})
    if not messages:
        raise bad_request("the conversation is empty: give 'input'", "input")
    return messages


def _tools(raw: list | None) -> list[dict]:
    tools = []
    for i, tool in enumerate(raw or ()):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise bad_request(f"'{where}' must be an object", where)
        if tool.get("type") != "function":
            raise bad_request(f"'{where}.type' must be 'function' (the only tool type this server supports), got "
                              f"{tool.get('type')!r}", f"{where}.type")
        f = Fields(tool, where + ".")
        name = _required_str(f, "name")
        tools.append({"type": "function", "name": name, "description": f.str("description"),
                      "parameters": f.dict("parameters"), "strict": f.bool("strict", True)})
    return tools


def _tool_choice(raw: Any, tools: list[dict]) -> str | dict:
    if raw is None:
        return "auto"
    if isinstance(raw, str):
        return tool_choice_mode(raw, bool(tools))
    if not isinstance(raw, dict) or raw.get("type") != "function" or not isinstance(raw.get("name"), str):
        raise bad_request("'tool_choice' object must be {\"type\": \"function\", \"name\": ...}", "tool_choice")
    if raw["name"] not in {t["name"] for t in tools}:
        raise bad_request(f"'tool_choice' names function {raw['name']!r}, which is not in 'tools'", "tool_choice")
    return {"type": "function", "name": raw["name"]}


def _text_format(text: dict | None) -> dict:
    fmt = Fields(text or {}, "text.").dict("format") or {"type": "text"}
    kind = fmt.get("type")
    if kind in ("text", "json_object"):
        return {"type": kind}
    if kind != "json_schema":
        raise bad_request(f"'text.format.type' must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                          "text.format.type")
    f = Fields(fmt, "text.format.")
    schema = f.dict("schema")
    if schema is None:
        raise bad_request("'text.format.schema' is required for type 'json_schema'", "text.format.schema")
    out = {"type": "json_schema", "name": f.str("name") or "response", "schema": schema,
           "strict": bool(f.bool("strict", False))}
    description = f.str("description")
    return {**out, "description": description} if description is not None else out


def _metadata(raw: dict | None) -> dict[str, str]:
    """OpenAI's limits: at most 16 pairs, keys up to 64 characters, string values up to 512."""
    raw = raw or {}
    if len(raw) > 16:
        raise bad_request("'metadata' may hold at most 16 key-value pairs", "metadata")
    for key, value in raw.items():
        if len(key) > 64 or not isinstance(value, str) or len(value) > 512:
            raise bad_request(f"'metadata.{key}': keys are at most 64 characters, values strings of at most 512",
                              f"metadata.{key}")
    return dict(raw)
