"""Whisper's decoding rules for one window: token suppression, the timestamp grammar, and how a window's
sampled tokens become segments and the next window's start (OpenAI's transcribe loop, as HF's long-form
generation also follows it)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.whisper_vocab import MAX_INITIAL_TIMESTAMP_S, SECONDS_PER_TIMESTAMP, WhisperVocab

NEG_INF = float("-inf")


def apply_rules(logits: torch.Tensor, sampled: list[int], vocab: WhisperVocab, timestamps: bool) -> torch.Tensor:
    """Mask one row's logits [V] (float32, in place) for the next token after `sampled` (this window's
    sampled tokens so far)."""
    if vocab.suppress_ids:
        logits[list(vocab.suppress_ids)] = NEG_INF
    if not sampled and vocab.begin_suppress_ids:
        logits[list(vocab.begin_suppress_ids)] = NEG_INF
    if not timestamps:
        return logits
    begin = vocab.timestamp_begin
    logits[vocab.no_timestamps] = NEG_INF
    # Timestamps come in pairs (an end then the next start), except a window's first and last ones.
    last_was_ts = len(sampled) >= 1 and sampled[-1] >= begin
    penultimate_was_ts = len(sampled) < 2 or sampled[-2] >= begin
    if last_was_ts:
        if penultimate_was_ts:      # a pair just closed: text must follow
            logits[begin:] = NEG_INF
        else:                       # a segment's end: another timestamp or the end of the window
            logits[:vocab.eot] = NEG_INF
    seen = [t for t in sampled if t >= begin]
    if seen:   # timestamps never go back (and a new segment's start is not its previous end twice)
        floor = seen[-1] if last_was_ts and not penultimate_was_ts else seen[-1] + 1
        logits[begin:floor] = NEG_INF
    if not sampled:                 # a window starts with a timestamp, early in the window
        logits[:begin] = NEG_INF
        last_allowed = begin + round(MAX_INITIAL_TIMESTAMP_S / SECONDS_PER_TIMESTAMP)
        logits[last_allowed + 1:] = NEG_INF
    # When the timestamps together are likelier than any single text token, take a timestamp.
    logprobs = torch.log_softmax(logits, dim=-1)
    if torch.logsumexp(logprobs[begin:], dim=-1) > logprobs[:begin].max():
        logits[:begin] = NEG_INF
    return logits


@dataclass(frozen=True, slots=True)
class WindowSegment:
    start: float                    # seconds from the clip's start
    end: float
    token_ids: list[int]            # text tokens only


def closed_segment(sampled: list[int], vocab: WhisperVocab, time_offset: float) -> WindowSegment | None:
    """The segment the last sampled token closed, if it closed one: with timestamps on, a segment is final
    once two timestamps follow each other (its end, the next one's start)."""
    begin = vocab.timestamp_begin
    if len(sampled) < 2 or sampled[-1] < begin or sampled[-2] < begin:
        return None
    # the segment runs from the previous pair (or the window's first token) to sampled[-2]
    end = len(sampled) - 1
    start = 0
    for i in range(end - 1, 0, -1):
        if sampled[i] >= begin and sampled[i - 1] >= begin:
            start = i
            break
    return _segment(sampled[start:end], vocab, time_offset)


def finish_window(sampled: list[int], vocab: WhisperVocab, timestamps: bool, time_offset: float,
                  window_frames: int, num_closed: int) -> tuple[list[WindowSegment], int]:
    """A finished window's segments not yet reported (num_closed were, via closed_segment), and how many
    mel frames to advance (100 per second).

    With timestamps: tokens after the last closed pair are kept only when they end on a single timestamp
    (the speech ended inside the window); otherwise the next window starts at the last closed pair.
    """
    tokens = [t for t in sampled if t != vocab.eot]
    seconds = window_frames / 100
    if not timestamps:
        text = [t for t in tokens if t < vocab.eot]
        return [WindowSegment(time_offset, time_offset + seconds, text)], window_frames
    begin = vocab.timestamp_begin
    is_ts = [t >= begin for t in tokens]
    single_ending = len(is_ts) >= 2 and not is_ts[-2] and is_ts[-1]
    cuts = [i for i in range(1, len(tokens)) if is_ts[i] and is_ts[i - 1]]
    if not cuts:    # no closed pair: one segment for the window, ending at its last timestamp if any
        stamps = [t for t in tokens if t >= begin]
        duration = (stamps[-1] - begin) * SECONDS_PER_TIMESTAMP if stamps and stamps[-1] != begin else seconds
        text = [t for t in tokens if t < vocab.eot]
        return [WindowSegment(time_offset, time_offset + duration, text)], window_frames
    segments = []
    if single_ending:
        tail = _segment(tokens[cuts[-1]:], vocab, time_offset)
        segments.append(tail)
        advance = window_frames
    else:
        last_end = tokens[cuts[-1] - 1] - begin            # in timestamp steps of 0.02 s = 2 frames
        advance = last_end * 2
    closed = [_segment(tokens[a:b], vocab, time_offset) for a, b in zip([0, *cuts[:-1]], cuts)]
    return [*closed[num_closed:], *segments], max(advance, 1)


def _segment(tokens: list[int], vocab: WhisperVocab, time_offset: float) -> WindowSegment:
    begin = vocab.timestamp_begin
    stamps = [t for t in tokens if t >= begin]
    start = (stamps[0] - begin) * SECONDS_PER_TIMESTAMP if stamps else 0.0
    end = (stamps[-1] - begin) * SECONDS_PER_TIMESTAMP if stamps else start
    return WindowSegment(round(time_offset + start, 3), round(time_offset + end, 3),
                         [t for t in tokens if t < vocab.eot])
