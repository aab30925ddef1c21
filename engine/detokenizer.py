"""Streaming text out of generated ids: incremental detokenization and stop-string matching."""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol

# Prompt tokens decoded ahead of the output, so the first output token reads as a continuation
# (e.g. SentencePiece's leading-space strip applies to the prompt, not to the output).
_PROMPT_CONTEXT_TOKENS = 5
# A tail that has stayed undecodable for this many tokens is invalid bytes, not a character in progress.
_MAX_HELD_TOKENS = 8
_REPLACEMENT = "\ufffd"


class _Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Turns a stream of output ids into a stream of text, never splitting a multi-byte character.

    Holds a short window of ids: `_ids[:_read_offset]` is text already emitted (or prompt context),
    decoded again only as context for what follows; `_ids[_read_offset:]` is not emitted yet. Each push
    decodes just this window, so the cost per token does not grow with the output. The concatenation of
    all pushes and `flush()` is the text the output adds after the prompt, which for byte-level BPE is
    exactly `tokenizer.decode(output_ids)`.
    """

    def __init__(self, tokenizer: _Decoder, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        context = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        if self._decode(context).endswith(_REPLACEMENT):
            context = []  # a prompt ending mid-character: the output's bytes must not complete the prompt's text
        self._ids = context
        self._read_offset = len(context)

    def push(self, new_token_ids: Sequence[int]) -> str:
        """Append ids; return the text they completed ("" while a character is still in progress)."""
        self._ids.extend(new_token_ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """At the end of the stream: whatever is still held back (e.g. a dangling partial character)."""
        return self._advance(final=True)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def _advance(self, final: bool) -> str:
        window, num_seen = self._ids, self._read_offset
        seen = self._decode(window[:num_seen])
        cut, text = len(window), self._decode(window)
        if text.endswith(_REPLACEMENT) and not final:
            # Emit up to the last token boundary where the text ends cleanly; the partial character waits.
            # A partial character is at most 3 bytes, so only the last 3 boundaries can hold it back.
            for cut in range(len(window) - 1, max(num_seen, len(window) - 4), -1):
                text = self._decode(window[:cut])
                if not text.endswith(_REPLACEMENT):
                    break
            else:
                if len(window) - num_seen <= _MAX_HELD_TOKENS:
                    return ""
                # Invalid bytes: every byte before the last 3 tokens is settled, whatever comes next.
                cut = len(window) - 3
                text = self._decode(window[:cut])
        if cut <= num_seen or len(text) <= len(seen):
            if cut == len(window) and len(window) > 2 * _MAX_HELD_TOKENS:
                # A run of ids that add no text (skipped special tokens): mark them read, keep a short context.
                self._ids = window[-_PROMPT_CONTEXT_TOKENS:]
                self._read_offset = len(self._ids)
            return ""
        # Slide the window: the ids just emitted become the context for the next push.
        self._ids = window[num_seen:]
        self._read_offset = cut - num_seen
        return text[len(seen):]


class StopCheck(NamedTuple):
    """What `StopStringMatcher.push` lets through."""

    text: str              # safe to emit now
    stopped: bool          # a stop string matched: the request is finished
    stop_str: str | None   # which one


class StopStringMatcher:
    """Finds stop strings in streamed text, holding back any tail that could be the start of one."""

    def __init__(self, stop: Sequence[str], include_stop_str_in_output: bool = False) -> None:
        self._stops = tuple(s for s in stop if s)
        self._include = include_stop_str_in_output
        self._max_partial = max((len(s) for s in self._stops), default=1) - 1
        self._held = ""
        self.stop_str: str | None = None

    @property
    def stopped(self) -> bool:
        return self.stop_str is not None

    def push(self, text: str) -> StopCheck:
        """Feed the next piece; the returned text is cut at the first stop string (kept if asked)."""
        if self.stopped:
            return StopCheck("", True, self.stop_str)
        buffer = self._held + text
        # NOTE: only `_held` (< longest stop) is searched twice, so this is linear in the text.
        match = self._first_match(buffer)
        if match is not None:
            start, stop = match
            self._held, self.stop_str = "", stop
            return StopCheck(buffer[:start + (len(stop) if self._include else 0)], True, stop)
        keep = self._partial_tail(buffer)
        self._held = buffer[len(buffer) - keep:]
        return StopCheck(buffer[:len(buffer) - keep], False, None)

    def flush(self) -> str:
        """At the end of the stream (no stop matched): the held-back tail, which is plain text after all."""
        held, self._held = self._held, ""
        return held

    def _first_match(self, buffer: str) -> tuple[int, str] | None:
        best: tuple[int, str] | None = None
        for stop in self._stops:
            at = buffer.find(stop)
            # Earliest start wins; at the same start the longer stop string does.
            if at >= 0 and (best is None or at < best[0] or (at == best[0] and len(stop) > len(best[1]))):
                best = (at, stop)
        return best

    def _partial_tail(self, buffer: str) -> int:
        """Length of the longest suffix of `buffer` that is a proper prefix of some stop string."""
        for length in range(min(len(buffer), self._max_partial), 0, -1):
            tail = buffer[-length:]
            if any(stop.startswith(tail) for stop in self._stops):
                return length
        return 0
