"""Chat request parsing: messages, tools and tool_choice validated into a ChatRequest."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from launcher.server.errors import bad_request
from launcher.server.fields import Fields
from launcher.server.protocol import (MAX_LOGPROBS, SamplingFields, model_field, read_sampling, read_stream_options,
                                      refuse_unsupported)
from launcher.server.structured import read_constraint
from launcher.server.tool_parsers import tool_choice_constraint, validate_tools

ROLES = ("system", "developer", "user", "assistant", "tool")
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass(frozen=True, slots=True)
class ChatRequest:
    model: str
    messages: list[dict]                   # normalized: role, content (str | text parts | None), extras
    sampling: SamplingFields
    stream: bool = False
    include_usage: bool = False
    continuous_usage_stats: bool = False
    tools: list[dict] | None = None
    tool_choice: str | dict = "auto"       # 'none' | 'auto' | 'required' | {"type": "function", ...}
    parallel_tool_calls: bool = True
    response_format: dict | None = None
    structured_outputs: dict | None = None
    constraint: Any = None                 # built by protocol.structured_output_constraint
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict = field(default_factory=dict)
    top_logprobs: int | None = None


def parse_chat_request(body: dict, vocab_size: int) -> ChatRequest:
    f = Fields(body)
    model = model_field(f)
    refuse_unsupported(f, ("functions", "function_call", "audio", "prediction"))
    messages = _messages(f.raw("messages"))
    want_logprobs = bool(f.bool("logprobs", False))
    top_logprobs = f.int("top_logprobs", lo=0, hi=MAX_LOGPROBS)
    if top_logprobs is not None and not want_logprobs:
        raise bad_request("'top_logprobs' requires 'logprobs' to be true", "top_logprobs")
    stream = bool(f.bool("stream", False))
    include_usage, continuous = read_stream_options(f, stream)
    sampling = read_sampling(f, vocab_size, (top_logprobs or 0) if want_logprobs else None)
    if stream and sampling.best_of is not None and sampling.best_of > sampling.n:
        raise bad_request("'best_of' > n cannot be streamed", "best_of")
    tools = _tools(f.list("tools"))
    tool_choice = _tool_choice(f.raw("tool_choice"), tools)
    parallel_tool_calls = bool(f.bool("parallel_tool_calls", True))
    response_format, structured = f.dict("response_format"), f.dict("structured_outputs")
    constraint = read_constraint(f)
    validate_tools(tools)
    tool_constraint = tool_choice_constraint(tools, tool_choice, parallel_tool_calls)
    if tool_constraint is not None:
        if constraint is not None:
            raise bad_request("'tool_choice' 'required' or a named function cannot be combined with "
                              "response_format or structured outputs", "tool_choice")
        constraint = tool_constraint
    sampling = dataclasses.replace(sampling, structured=constraint)
    add_generation_prompt = bool(f.bool("add_generation_prompt", True))
    continue_final = bool(f.bool("continue_final_message", False))
    if continue_final and add_generation_prompt and f.has("add_generation_prompt"):
        raise bad_request("'continue_final_message' and 'add_generation_prompt' cannot both be true",
                          "continue_final_message")
    if continue_final and messages[-1]["role"] != "assistant":
        raise bad_request("'continue_final_message' needs an assistant message last", "continue_final_message")
    f.str("user")
    return ChatRequest(
        model=model, messages=messages, sampling=sampling, stream=stream, include_usage=include_usage,
        continuous_usage_stats=continuous, tools=tools, tool_choice=tool_choice,
        parallel_tool_calls=parallel_tool_calls, response_format=response_format,
        structured_outputs=structured, constraint=constraint,
        add_generation_prompt=add_generation_prompt and not continue_final,
        continue_final_message=continue_final, chat_template_kwargs=f.dict("chat_template_kwargs") or {},
        top_logprobs=top_logprobs)


def _messages(raw: Any) -> list[dict]:
    if raw is None:
        raise bad_request("'messages' is required", "messages")
    if not isinstance(raw, list):
        raise bad_request("'messages' must be an array of message objects", "messages")
    if not raw:
        raise bad_request("'messages' must hold at least one message", "messages")
    return [_message(m, i) for i, m in enumerate(raw)]


def _message(raw: Any, i: int) -> dict:
    where = f"messages[{i}]"
    if not isinstance(raw, dict):
        raise bad_request(f"'{where}' must be an object", where)
    f = Fields(raw, where + ".")
    role = f.raw("role")
    if role not in ROLES:
        raise bad_request(f"'{where}.role' must be one of {', '.join(ROLES)}, got {role!r}", f"{where}.role")
    message = dict(raw)
    message["content"] = _content(raw.get("content"), f"{where}.content", role, "tool_calls" in raw)
    if role == "developer":
        message["role"] = "system"  # OpenAI's newer name for the system role; templates know 'system'
    if f.has("name"):
        f.str("name")
    if role == "tool" and raw.get("tool_call_id") is not None:
        f.str("tool_call_id")
    if role == "assistant" and raw.get("tool_calls") is not None:
        message["tool_calls"] = _tool_calls(raw["tool_calls"], f"{where}.tool_calls")
    return message


def _content(content: Any, where: str, role: str, has_tool_calls: bool) -> str | list[dict] | None:
    if content is None:
        if role == "assistant":
            return None  # an assistant turn that only called tools
        raise bad_request(f"'{where}' is required for role {role!r}", where)
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"'{where}' must be a string or an array of content parts", where)
    parts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict):
            raise bad_request(f"'{where}[{j}]' must be an object", f"{where}[{j}]")
        kind = part.get("type")
        if kind in ("text", "input_text", "output_text", "refusal"):
            text = part.get("text", part.get("refusal"))
            if not isinstance(text, str):
                raise bad_request(f"'{where}[{j}].text' must be a string", f"{where}[{j}].text")
            parts.append({"type": "text", "text": text})
        elif kind in ("image_url", "input_image"):
            parts.append(image_part(part, f"{where}[{j}]"))
        elif kind in ("input_audio", "file", "video_url", "audio_url"):
            raise bad_request(f"'{where}[{j}]': {kind!r} parts are not supported (text and image_url are)",
                              f"{where}[{j}].type")
        else:
            raise bad_request(f"'{where}[{j}].type' must be 'text' or 'image_url', got {kind!r}", f"{where}[{j}].type")
    return parts


def image_part(part: dict, where: str) -> dict:
    """An image content part -> {"type": "image", "url": ...} (the part chat templates look for).

    Chat's shape is {"image_url": {"url": ..., "detail": ...}}; the Responses API's (and some clients')
    {"image_url": "..."}. `detail` is accepted and ignored: each model resizes images its own way."""
    ref = part.get("image_url")
    url = ref.get("url") if isinstance(ref, dict) else ref
    if not isinstance(url, str) or not url:
        raise bad_request(f"'{where}.image_url.url' must be a string (a data:, file:// or http(s) URL)",
                          f"{where}.image_url")
    return {"type": "image", "url": url}


def has_images(messages: list[dict]) -> bool:
    return any(isinstance(m.get("content"), list) and any(p["type"] == "image" for p in m["content"])
               for m in messages)


def _tool_calls(raw: Any, where: str) -> list[dict]:
    if not isinstance(raw, list):
        raise bad_request(f"'{where}' must be an array", where)
    calls = []
    for j, call in enumerate(raw):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise bad_request(f"'{where}[{j}].function.name' must be a string", f"{where}[{j}].function.name")
        arguments = fn.get("arguments", "{}")
        if not isinstance(arguments, (str, dict)):
            raise bad_request(f"'{where}[{j}].function.arguments' must be a JSON string",
                              f"{where}[{j}].function.arguments")
        calls.append({**call, "function": {**fn, "arguments": arguments}})
    return calls


def _tools(raw: list | None) -> list[dict] | None:
    if raw is None:
        return None
    tools = []
    for i, tool in enumerate(raw):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise bad_request(f"'{where}' must be an object with type 'function'", f"{where}.type")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise bad_request(f"'{where}.function' must be an object", f"{where}.function")
        name = fn.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.match(name):
            raise bad_request(f"'{where}.function.name' must be 1-64 letters, digits, '_', '.' or '-', "
                              f"got {name!r}", f"{where}.function.name")
        if fn.get("description") is not None and not isinstance(fn["description"], str):
            raise bad_request(f"'{where}.function.description' must be a string", f"{where}.function.description")
        params = fn.get("parameters")
        if params is not None and (not isinstance(params, dict) or
                                   params.get("type", "object") not in ("object", ["object"])):
            raise bad_request(f"'{where}.function.parameters' must be a JSON Schema object with type 'object'",
                              f"{where}.function.parameters")
        tools.append({"type": "function", "function": fn})
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) != len(names):
        raise bad_request("'tools' holds two functions with the same name", "tools")
    return tools or None


def tool_choice_mode(raw: str, has_tools: bool) -> str:
    """A string tool_choice (chat's and the Responses API's): 'none', 'auto' or 'required' (with tools)."""
    if raw not in ("none", "auto", "required"):
        raise bad_request(f"'tool_choice' must be 'none', 'auto', 'required' or a function, got {raw!r}",
                          "tool_choice")
    if raw == "required" and not has_tools:
        raise bad_request("'tool_choice' is 'required' but no 'tools' were given", "tool_choice")
    return raw


def _tool_choice(raw: Any, tools: list[dict] | None) -> str | dict:
    if raw is None:
        return "auto" if tools else "none"
    if isinstance(raw, str):
        return tool_choice_mode(raw, bool(tools))
    name = raw.get("function", {}).get("name") if isinstance(raw, dict) and isinstance(raw.get("function"), dict) \
        else None
    if not isinstance(name, str):
        raise bad_request("'tool_choice' object must be {\"type\": \"function\", \"function\": {\"name\": ...}}",
                          "tool_choice")
    if not tools or name not in {t["function"]["name"] for t in tools}:
        raise bad_request(f"'tool_choice' names function {name!r}, which is not in 'tools'", "tool_choice")
    return raw
