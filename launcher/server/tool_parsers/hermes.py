"""Hermes / Qwen2.5 / SmolLM2 tool calls: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks."""
from __future__ import annotations

from launcher.server.tool_parsers.base import ToolCallParser, call_from_json, held_prefix_len

OPEN, CLOSE = "<tool_call>", "</tool_call>"


class HermesParser(ToolCallParser):
    """Text outside the blocks is content. A block is decided when its closing tag (or the end) comes: a valid
    call is sent as a whole, anything else goes out unchanged as content, markers included."""

    def _reset_state(self) -> None:
        self._buf = ""          # undecided text: a possible start of OPEN, or the body of an open block
        self._inside = False

    def feed(self, delta_text: str) -> list[dict]:
        self._buf += delta_text
        out: list[dict] = []
        while True:
            if not self._inside:
                at = self._buf.find(OPEN)
                if at < 0:
                    keep = held_prefix_len(self._buf, OPEN)
                    self._content(self._buf[:len(self._buf) - keep], out)
                    self._buf = self._buf[len(self._buf) - keep:]
                    return out
                self._content(self._buf[:at], out)
                self._buf, self._inside = self._buf[at + len(OPEN):], True
            else:
                at = self._buf.find(CLOSE)
                if at < 0:
                    return out
                body = self._buf[:at]
                self._buf, self._inside = self._buf[at + len(CLOSE):], False
                self._block(body, OPEN + body + CLOSE, out)

    def finish(self) -> list[dict]:
        out: list[dict] = []
        if self._inside:  # no closing tag: models often end on eos right after the JSON
            self._block(self._buf, OPEN + self._buf, out)
        else:
            self._content(self._buf, out)
        self._reset_state()
        return out

    def _block(self, body: str, raw: str, out: list[dict]) -> None:
        call = call_from_json(body, self.tool_names)
        if call is None:
            self._content(raw, out)  # malformed: the client sees exactly what the model wrote
        else:
            self._call(*call, out)
