"""Tools for chat templates that ignore them (SmolLM2's, many small models'): the functions go into a system
message in the Hermes format the default parser reads back, and past calls and results become text, so the
model can see what it may call and what it called. Templates that render `tools` themselves are left alone."""
from __future__ import annotations

import json
import re
from typing import Any

TOOLS_PROMPT = (
    "You may call functions to help with the user's request. The functions, as JSON schemas:\n"
    "<tools>\n{tools}\n</tools>\n"
    "To call a function, answer with a JSON object inside <tool_call></tool_call> tags, one block per call:\n"
    "<tool_call>\n{{\"name\": <function name>, \"arguments\": <arguments as a JSON object>}}\n</tool_call>")


def template_renders_tools(chat_template: str | None) -> bool:
    """Whether the template reads the `tools` variable (then it describes them its own way)."""
    return bool(chat_template) and re.search(r"\btools\b", chat_template) is not None


def with_tools_as_text(messages: list[dict], tools: list[dict]) -> list[dict]:
    """`messages` (already in the template's content format) with the tool prompt in the system message,
    assistant tool calls as <tool_call> blocks and tool results as <tool_response> user turns."""
    prompt = TOOLS_PROMPT.format(tools="\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools))
    out = []
    for m in messages:
        if m.get("role") == "assistant" and m.get("tool_calls"):
            calls = "\n".join(_call_block(c) for c in m["tool_calls"])
            text = _text(m.get("content"))
            rest = {k: v for k, v in m.items() if k != "tool_calls"}
            out.append({**rest, "content": _like(m.get("content"), f"{text}\n{calls}" if text else calls)})
        elif m.get("role") == "tool":
            body = f"<tool_response>\n{_text(m.get('content'))}\n</tool_response>"
            out.append({"role": "user", "content": _like(m.get("content"), body)})
        else:
            out.append(m)
    if out and out[0].get("role") == "system":
        system = _text(out[0].get("content"))
        out[0] = {**out[0], "content": _like(out[0].get("content"), f"{system}\n\n{prompt}" if system else prompt)}
    else:
        out.insert(0, {"role": "system", "content": _like(messages[0].get("content") if messages else "", prompt)})
    return out


def _call_block(call: dict) -> str:
    function = call.get("function", {})
    arguments: Any = function.get("arguments") or "{}"
    try:
        arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
    except json.JSONDecodeError:
        pass   # shown as the string it is
    return "<tool_call>\n" + json.dumps({"name": function.get("name"), "arguments": arguments},
                                        ensure_ascii=False) + "\n</tool_call>"


def _text(content: str | list | None) -> str:
    if isinstance(content, list):
        return "\n".join(part.get("text", "") for part in content if part.get("type") == "text")
    return content or ""


def _like(example: str | list | None, text: str) -> str | list:
    """`text` in the content format of `example`: a string, or a list of parts."""
    return [{"type": "text", "text": text}] if isinstance(example, list) else text
