"""The seam for tool-call parsing: how a sample's generated text splits into content and tool calls.

`launcher.server.tool_parsers` (when present) provides
    make_tool_parser(tokenizer, request: ChatRequest) -> OutputParser | None
and serving_chat uses the returned object, one per sample, for both streaming and non-streaming answers.
Until then (or when a request has no tools, or tool_choice is 'none') the text is plain content.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
from dataclasses import dataclass, field
from typing import Protocol

from launcher.server.protocol_chat import ChatRequest

log = logging.getLogger("llm.server")


@dataclass(slots=True)
class ParsedOutput:
    content: str | None
    tool_calls: list[dict] = field(default_factory=list)   # OpenAI shape: {"id", "type": "function", "function"}


class OutputParser(Protocol):
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
    """No tool parsing: everything generated is content."""

    has_tool_calls = False

    def parse(self, text: str) -> ParsedOutput:
        return ParsedOutput(text)

    def feed(self, delta_text: str) -> list[dict]:
        return [{"content": delta_text}] if delta_text else []

    def finish(self) -> list[dict]:
        return []


def make_output_parser(tokenizer, request: ChatRequest) -> OutputParser:
    """A fresh parser for one sample of `request`."""
    if not request.tools or request.tool_choice == "none":
        return PlainContent()
    if importlib.util.find_spec("launcher.server.tool_parsers") is None:
        return PlainContent()   # not written yet: tools are rendered into the prompt, output stays content
    module = importlib.import_module("launcher.server.tool_parsers")
    factory = getattr(module, "make_tool_parser", None)
    parser = factory(tokenizer, request) if factory is not None else None
    return parser if parser is not None else PlainContent()
