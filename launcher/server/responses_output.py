"""One sample's parsed output -> Responses output items and the typed stream events that build them.

The same pass serves both answers: streaming sends every event, non-streaming feeds the whole text at once and
keeps only the items, so the two can never disagree."""
from __future__ import annotations

from collections.abc import Callable

from launcher.server.protocol_responses import new_item_id


class OutputBuilder:
    """Parser pieces ({"content"} / {"tool_calls"} deltas, see tool_parsers.base) in, output items and events out.
    Events lack sequence_number (the sender numbers them); `logprobs_of` turns engine logprobs into OpenAI's."""

    def __init__(self, logprobs_of: Callable[[list], list[dict]] | None = None):
        self.items: list[dict] = []
        self._logprobs_of = logprobs_of       # None: the request did not include logprobs
        self._open: dict | None = None        # the item being written (a message or a function_call)
        self._pending_logprobs: list[dict] = []

    def feed(self, pieces: list[dict], logprobs: list) -> list[dict]:
        events: list[dict] = []
        if self._logprobs_of is not None and logprobs:
            self._pending_logprobs += self._logprobs_of(logprobs)
        for piece in pieces:
            if piece.get("content"):
                self._text(piece["content"], events)
            for call in piece.get("tool_calls", ()):
                if "id" in call:
                    self._close("completed", events)
                    self._add({"type": "function_call", "id": new_item_id("fc"), "call_id": call["id"],
                               "name": call["function"]["name"], "arguments": "", "status": "in_progress"}, events)
                if call["function"]["arguments"]:
                    item = self._open
                    item["arguments"] += call["function"]["arguments"]
                    events.append({"type": "response.function_call_arguments.delta", "item_id": item["id"],
                                   "output_index": len(self.items) - 1, "delta": call["function"]["arguments"]})
        return events

    def finish(self, status: str) -> list[dict]:
        """The sample ended: close the open item with `status` ('completed', or 'incomplete' when cut by length).
        An answer with nothing in it is still one (empty) message."""
        events: list[dict] = []
        if not self.items:
            self._text("", events)
        self._close(status, events)
        return events

    def _text(self, text: str, events: list[dict]) -> None:
        if self._open is None or self._open["type"] != "message":
            self._close("completed", events)
            self._add({"type": "message", "id": new_item_id("msg"), "status": "in_progress", "role": "assistant",
                       "content": []}, events)
            part = self._part("")
            self._open["content"].append(part)
            events.append({"type": "response.content_part.added", "item_id": self._open["id"],
                           "output_index": len(self.items) - 1, "content_index": 0, "part": _copy(part)})
        part = self._open["content"][0]
        logprobs, self._pending_logprobs = self._pending_logprobs, []
        part["text"] += text
        if "logprobs" in part:
            part["logprobs"] += logprobs
        if text or logprobs:
            events.append({"type": "response.output_text.delta", "item_id": self._open["id"],
                           "output_index": len(self.items) - 1, "content_index": 0, "delta": text,
                           "logprobs": logprobs})

    def _part(self, text: str) -> dict:
        part = {"type": "output_text", "text": text, "annotations": []}
        if self._logprobs_of is not None:
            part["logprobs"] = []
        return part

    def _add(self, item: dict, events: list[dict]) -> None:
        self.items.append(item)
        self._open = item
        events.append({"type": "response.output_item.added", "output_index": len(self.items) - 1,
                       "item": _copy(item)})

    def _close(self, status: str, events: list[dict]) -> None:
        item = self._open
        if item is None:
            return
        if item["type"] == "message" and self._pending_logprobs:
            self._text("", events)   # tokens with no text of their own (end of sequence, a held-back stop)
        self._open = None
        index = len(self.items) - 1
        if item["type"] == "message":
            part = item["content"][0]
            events.append({"type": "response.output_text.done", "item_id": item["id"], "output_index": index,
                           "content_index": 0, "text": part["text"], "logprobs": part.get("logprobs", [])})
            events.append({"type": "response.content_part.done", "item_id": item["id"], "output_index": index,
                           "content_index": 0, "part": _copy(part)})
        else:
            self._pending_logprobs = []   # a call's tokens: OpenAI gives logprobs of output_text only
            events.append({"type": "response.function_call_arguments.done", "item_id": item["id"],
                           "output_index": index, "arguments": item["arguments"]})
        item["status"] = status
        events.append({"type": "response.output_item.done", "output_index": index, "item": _copy(item)})


def _copy(obj: dict) -> dict:
    """A snapshot for an event (the item keeps growing after it is sent)."""
    return {k: ([dict(x) if isinstance(x, dict) else x for x in v] if isinstance(v, list) else v)
            for k, v in obj.items()}
