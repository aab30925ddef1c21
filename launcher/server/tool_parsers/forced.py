"""Parsers for answers constrained by tool_choice: 'required' (a JSON array of {name, parameters}) and a named
function (the arguments object alone). The grammar makes the shape certain, so arguments stream as they come."""
from __future__ import annotations

import json

from launcher.server.tool_parsers.base import ToolCallParser


class NamedCallParser(ToolCallParser):
    """tool_choice names one function: the whole answer is its arguments, so there is exactly one call."""

    def __init__(self, name: str):
        self.name = name
        super().__init__((name,), parallel_tool_calls=False)

    def _reset_state(self) -> None:
        self._index: int | None = None

    def feed(self, delta_text: str) -> list[dict]:
        out: list[dict] = []
        if self._index is None:
            delta_text = delta_text.lstrip()  # space before the object carries nothing
            if not delta_text:
                return out
            self._index = self._start_call(self.name, out)
        self._arguments(self._index, delta_text, out)
        return out

    def finish(self) -> list[dict]:
        out: list[dict] = []
        if self._index is None:  # nothing generated (max_tokens ran out at once): still the one call
            self._call(self.name, "{}", out)
        self._reset_state()
        return out


class RequiredCallsParser(ToolCallParser):
    """tool_choice 'required': reads `[{"name": ..., "parameters": {...}}, ...]` a character at a time. A call
    starts once its name is read; the characters of its parameters value are its argument fragments."""

    def _reset_state(self) -> None:
        self._raw = ""              # everything seen: content if no call came out of it
        self._depth = 0             # open [ and { outside strings; a call object is depth 2
        self._in_string = self._escaped = False
        self._new_object()

    def _new_object(self) -> None:
        self._expect: str | None = None   # 'key' or 'value', for what comes next inside a call object
        self._key: str | None = None
        self._string: str | None = None   # raw characters of a key or name string being read
        self._started = False
        self._index: int | None = None    # None: not started yet, or dropped (parallel_tool_calls false)
        self._capturing = False
        self._pending = ""                # argument characters not yet sent
        self._sent_args = False

    def feed(self, delta_text: str) -> list[dict]:
        out: list[dict] = []
        self._raw += delta_text
        for c in delta_text:
            self._step(c, out)
        self._flush(out)
        return out

    def finish(self) -> list[dict]:
        out: list[dict] = []
        self._flush(out)
        if not self.has_tool_calls:  # cut off before any name: the text, not a silent empty answer
            self._content(self._raw, out)
        self._reset_state()
        return out

    def _step(self, c: str, out: list[dict]) -> None:
        if self._capturing:
            self._pending += c
        if self._in_string:
            if self._escaped:
                self._escaped = False
            elif c == "\\":
                self._escaped = True
            elif c == '"':
                self._in_string = False
                if self._string is not None:
                    self._string_done(out)
                return
            if self._string is not None:
                self._string += c
            return
        at_call = self._depth == 2 and not self._capturing
        if c == '"':
            self._in_string = True
            if at_call and (self._expect == "key" or (self._expect == "value" and self._key == "name")):
                self._string = ""
            return
        if at_call and self._expect == "value" and self._key == "parameters" and not c.isspace():
            self._capturing = True
            self._pending += c
        if c in "{[":
            self._depth += 1
            if self._depth == 2 and c == "{":
                self._new_object()
                self._expect = "key"
        elif c in "}]":
            self._depth -= 1
            if self._capturing and self._depth == 2:
                self._capturing, self._expect = False, None
            elif self._depth == 1 and c == "}":
                self._end_object(out)
        elif at_call and c == ":":
            self._expect = "value"
        elif at_call and c == ",":
            self._expect = "key"

    def _string_done(self, out: list[dict]) -> None:
        try:
            text = json.loads('"' + self._string + '"')
        except ValueError:
            text = None
        self._string = None
        if self._expect == "key":
            self._key = text
        elif isinstance(text, str) and text in self.tool_names and not self._started:
            self._flush(out)
            self._started = True
            self._index = self._start_call(text, out)
        self._expect = None

    def _end_object(self, out: list[dict]) -> None:
        self._flush(out)
        if self._started and not self._sent_args:
            self._arguments(self._index, "{}", out)  # a call with no parameters value
        self._new_object()

    def _flush(self, out: list[dict]) -> None:
        if self._started and self._pending:
            self._arguments(self._index, self._pending, out)
            self._sent_args = True
            self._pending = ""
