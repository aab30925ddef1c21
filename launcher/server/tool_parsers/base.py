"""Shared parts of the tool-call parsers: the OutputParser seam, call ids, content hold-back, delta shapes,
parse() as one streamed pass."""
from __future__ import annotations

import json
import secrets
import string
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Protocol

_ID_ALPHABET = string.ascii_letters + string.digits


@dataclass(slots=True)
class ParsedOutput:
    content: str | None
    tool_calls: list[dict] = field(default_factory=list)   # OpenAI shape: {"id", "type": "function", "function"}


class OutputParser(Protocol):
    """How a sample's generated text splits into content and tool calls; serving_chat uses one per sample,
    for streaming and non-streaming answers alike."""

    def parse(self, text: str) -> ParsedOutput:
        """The whole generated text of a sample -> content and tool calls (non-streaming)."""

    def feed(self, delta_text: str) -> list[dict]:
        """Streaming: the next piece of text -> zero or more delta objects ({"content": ...} or
        {"tool_calls": [{"index", "id", "type", "function": {"name", "arguments"}}]}), text it holds back
        while deciding is returned by a later call or by finish()."""

    def finish(self) -> list[dict]:
        """Streaming: the sample ended; any held-back deltas."""

    @property
    def has_tool_calls(self) -> bool:
        """Whether any tool call was produced (finish_reason becomes 'tool_calls')."""


class PlainContent:
    """No tool parsing (no tools, or tool_choice 'none'): everything generated is content."""

    has_tool_calls = False

    def parse(self, text: str) -> ParsedOutput:
        return ParsedOutput(text)

    def feed(self, delta_text: str) -> list[dict]:
        return [{"content": delta_text}] if delta_text else []

    def finish(self) -> list[dict]:
        return []


def new_call_id() -> str:
    """OpenAI's shape of a tool-call id: 'call_' and 24 random letters and digits."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


def held_prefix_len(text: str, marker: str) -> int:
    """Length of the longest end of `text` that could be the start of `marker` (held back until it is decided)."""
    for k in range(min(len(text), len(marker) - 1), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


def call_from_json(text: str, tool_names: Collection[str]) -> tuple[str, str] | None:
    """(name, arguments as JSON text) from one call object {"name", "arguments" | "parameters"}, or None
    when it is not one: bad JSON, no name, a function the request did not offer, arguments not an object."""
    try:
        obj = json.loads(text, parse_constant=_reject)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or obj["name"] not in tool_names:
        return None
    args = obj.get("arguments", obj.get("parameters"))
    if args is None:
        return obj["name"], "{}"
    if isinstance(args, str):  # some models emit the arguments already serialized
        try:
            decoded = json.loads(args, parse_constant=_reject)
        except ValueError:
            return None
        return (obj["name"], args) if isinstance(decoded, dict) else None
    if not isinstance(args, dict):
        return None
    return obj["name"], json.dumps(args, ensure_ascii=False)


def _reject(constant: str) -> None:
    raise ValueError(f"{constant} is not JSON")   # Python's json reads NaN / Infinity; clients' parsers do not


class ToolCallParser:
    """Base of every parser: subclasses implement feed() / finish() and report through _content, _start_call
    and _arguments. parse() runs the same streaming pass over the whole text, so a streamed answer and a
    non-streamed one can never disagree."""

    def __init__(self, tool_names: Collection[str], parallel_tool_calls: bool = True):
        self.tool_names = frozenset(tool_names)
        self.parallel_tool_calls = parallel_tool_calls
        self.reset()

    def reset(self) -> None:
        self._num_calls = 0
        self._held_space = ""   # whitespace-only content before any real content: dropped if nothing follows
        self._shown_content = False
        self._reset_state()

    def _reset_state(self) -> None:
        """Subclasses: clear their own streaming state."""

    @property
    def has_tool_calls(self) -> bool:
        return self._num_calls > 0

    def feed(self, delta_text: str) -> list[dict]:
        raise NotImplementedError

    def finish(self) -> list[dict]:
        raise NotImplementedError

    def parse(self, text: str) -> ParsedOutput:
        self.reset()
        return merge_deltas(self.feed(text) + self.finish())

    # -- what subclasses report ------------------------------------------------------------------

    def _content(self, text: str, out: list[dict]) -> None:
        if not text:
            return
        if not self._shown_content and not text.strip():
            self._held_space += text  # e.g. the newline between two calls is not an answer
            return
        out.append({"content": self._held_space + text})
        self._held_space, self._shown_content = "", True

    def _start_call(self, name: str, out: list[dict]) -> int | None:
        """The first delta of a call (index, id, name, empty arguments); None when parallel_tool_calls is
        false and a call was already made, so the caller drops this one."""
        if self._num_calls and not self.parallel_tool_calls:
            return None
        index = self._num_calls
        self._num_calls += 1
        out.append({"tool_calls": [{"index": index, "id": new_call_id(), "type": "function",
                                    "function": {"name": name, "arguments": ""}}]})
        return index

    @staticmethod
    def _arguments(index: int | None, fragment: str, out: list[dict]) -> None:
        if index is not None and fragment:
            out.append({"tool_calls": [{"index": index, "function": {"arguments": fragment}}]})

    def _call(self, name: str, arguments: str, out: list[dict]) -> None:
        self._arguments(self._start_call(name, out), arguments, out)


def merge_deltas(deltas: list[dict]) -> ParsedOutput:
    """Streaming deltas -> the non-streaming message: content joined (None when empty), calls by index."""
    content: list[str] = []
    calls: dict[int, dict] = {}
    for delta in deltas:
        if "content" in delta:
            content.append(delta["content"])
        for piece in delta.get("tool_calls", ()):
            call = calls.get(piece["index"])
            if call is None:
                assert "id" in piece, "the first delta of a call carries its id and name"
                calls[piece["index"]] = {"id": piece["id"], "type": "function",
                                         "function": {"name": piece["function"]["name"],
                                                      "arguments": piece["function"]["arguments"]}}
            else:
                call["function"]["arguments"] += piece["function"]["arguments"]
    text = "".join(content)
    return ParsedOutput(text or None, [calls[i] for i in sorted(calls)])
