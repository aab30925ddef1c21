"""Llama 3.x JSON tool calls: `{"name": ..., "parameters": {...}}`, maybe after `<|python_tag|>`, several
separated by `;`. Only an answer that starts with a call is parsed; anything else is content."""
from __future__ import annotations

from launcher.server.tool_parsers.base import ToolCallParser, call_from_json

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonParser(ToolCallParser):
    """Reads call objects from the start of the answer; the first thing that is not a call (plain text, JSON
    that is not a call, an unfinished object) turns the rest of the answer into content, unchanged."""

    def _reset_state(self) -> None:
        self._buf = ""          # undecided text, starting at a '{' once an object is being read
        self._skipped = ""      # tags, ';' and spaces read since the last call: content if no call follows
        self._is_content = False
        self._after_call = False
        self._reset_scan()

    def _reset_scan(self) -> None:
        self._scan, self._depth, self._in_string, self._escaped = 0, 0, False, False

    def feed(self, delta_text: str) -> list[dict]:
        self._buf += delta_text
        out: list[dict] = []
        if self._is_content:
            self._content(self._buf, out)
            self._buf = ""
            return out
        while True:
            if not self._buf.startswith("{"):
                if not self._skip_separator():
                    if self._buf and not PYTHON_TAG.startswith(self._buf):
                        self._to_content(out)   # not a call: the answer is text
                    return out
                continue
            end = self._object_end()
            if end < 0:
                return out
            call = call_from_json(self._buf[:end + 1], self.tool_names)
            if call is None:
                self._to_content(out)
                return out
            self._call(*call, out)
            self._buf, self._skipped, self._after_call = self._buf[end + 1:], "", True
            self._reset_scan()

    def finish(self) -> list[dict]:
        out: list[dict] = []
        if self._buf:  # an unfinished object or a stray tag start: text, as written
            self._content(self._skipped + self._buf, out)
        elif not self._after_call:
            self._content(self._skipped, out)
        self._reset_state()
        return out

    def _skip_separator(self) -> bool:
        """Move one leading space, tag or (between calls) ';' from the buffer to `skipped`."""
        buf = self._buf
        if buf[:1].isspace() or (self._after_call and buf.startswith(";")):
            n = 1
        elif buf.startswith(PYTHON_TAG):
            n = len(PYTHON_TAG)
        else:
            return False
        self._skipped += buf[:n]
        self._buf = buf[n:]
        return True

    def _to_content(self, out: list[dict]) -> None:
        self._is_content = True
        self._content(self._skipped + self._buf, out)
        self._buf = self._skipped = ""

    def _object_end(self) -> int:
        """Index of the '}' closing the object the buffer starts with, or -1 while it is open. Strings are
        respected; the scan resumes where the last call stopped."""
        buf = self._buf
        for i in range(self._scan, len(buf)):
            c = buf[i]
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif c == "\\":
                    self._escaped = True
                elif c == '"':
                    self._in_string = False
            elif c == '"':
                self._in_string = True
            elif c == "{":
                self._depth += 1
            elif c == "}":
                self._depth -= 1
                if self._depth == 0:
                    self._scan = i + 1
                    return i
        self._scan = len(buf)
        return -1
