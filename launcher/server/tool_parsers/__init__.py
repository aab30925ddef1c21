"""Tool-call parsing for chat answers: picks the parser for the model family and the request's tool_choice."""
from __future__ import annotations

from typing import Protocol

from launcher.server.tool_parsers.base import (OutputParser, ParsedOutput, PlainContent, ToolCallParser, merge_deltas,
                                               new_call_id)
from launcher.server.tool_parsers.forced import NamedCallParser, RequiredCallsParser
from launcher.server.tool_parsers.hermes import HermesParser
from launcher.server.tool_parsers.llama3_json import PYTHON_TAG, Llama3JsonParser
from launcher.server.tool_parsers.schema import named_function, tool_choice_constraint, validate_tools

PARSERS: dict[str, type[ToolCallParser]] = {"hermes": HermesParser, "llama3_json": Llama3JsonParser}
DEFAULT_PARSER = "hermes"   # SmolLM2, Qwen2.5, Hermes and most small chat models write <tool_call> blocks

__all__ = ["PARSERS", "OutputParser", "ParsedOutput", "PlainContent", "ToolCallParser", "detect_tool_parser",
           "make_output_parser", "make_tool_parser", "merge_deltas", "new_call_id", "tool_choice_constraint",
           "validate_tools"]


class ToolRequest(Protocol):
    """What the parsers read of a chat request (protocol_chat.ChatRequest has these)."""
    tools: list[dict] | None
    tool_choice: str | dict
    parallel_tool_calls: bool


def detect_tool_parser(chat_template: str | None, vocab: set[str] | frozenset[str] = frozenset()) -> str:
    """The parser name a model's chat template (and special tokens) point to."""
    template = chat_template or ""
    if "<tool_call>" in template or "<tool_call>" in vocab:
        return "hermes"
    if PYTHON_TAG in template or PYTHON_TAG in vocab or ("ipython" in template and '"parameters"' in template):
        return "llama3_json"
    return DEFAULT_PARSER


def make_output_parser(tokenizer, request: ToolRequest, chat_template: str | None = None) -> OutputParser:
    """A fresh parser for one sample of `request`: a tool-call parser, or plain content without tools."""
    return make_tool_parser(tokenizer, request, chat_template=chat_template) or PlainContent()


def make_tool_parser(tokenizer, request: ToolRequest, tool_parser: str | None = None,
                     chat_template: str | None = None) -> ToolCallParser | None:
    """A fresh parser for one sample of `request`, or None when its answer is plain content.

    tool_choice 'required' and named functions were decoded under a schema (see tool_choice_constraint), so
    their answers are read by the matching constrained parser; 'auto' uses `tool_parser` (a name in PARSERS,
    e.g. from a profile) or the one the chat template points to."""
    if not request.tools or request.tool_choice == "none":
        return None
    names = [t["function"]["name"] for t in request.tools]
    name = named_function(request.tool_choice)
    if name is not None:
        return NamedCallParser(name)
    if request.tool_choice == "required":
        return RequiredCallsParser(names, request.parallel_tool_calls)
    if tool_parser is None:
        tool_parser = detect_tool_parser(chat_template or getattr(tokenizer, "chat_template", None),
                                         _marker_tokens(tokenizer))
    if tool_parser not in PARSERS:
        raise ValueError(f"unknown tool parser {tool_parser!r}; known: {', '.join(sorted(PARSERS))}")
    return PARSERS[tool_parser](names, request.parallel_tool_calls)


def _marker_tokens(tokenizer) -> frozenset[str]:
    """Which call markers the vocabulary holds as single tokens (a template may not mention them)."""
    to_id = getattr(tokenizer, "token_to_id", None)
    if to_id is None:
        return frozenset()
    return frozenset(m for m in ("<tool_call>", PYTHON_TAG) if to_id(m) is not None)
