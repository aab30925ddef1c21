"""Engine outputs -> text: per-sample detokenizing, stop strings, logprobs, and merging request streams."""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from engine.async_client import EngineDeadError
from engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from engine.messages import TokenOutput
from engine.sampling_params import SamplingParams
from launcher.server.errors import APIError


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token_id: int
    logprob: float | None                  # None only for a prompt's first token (nothing predicts it)
    top: list[tuple[int, float]]           # the k most likely alternatives (may include token_id)


@dataclass(slots=True)
class Delta:
    """What one engine output adds to one sample: text safe to show, tokens, and the end if it came."""
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    num_new_tokens: int = 0
    finish_reason: str | None = None


class SampleText:
    """One sample's text as it streams: the detokenizer feeds the stop-string matcher."""

    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams, score_only: bool = False):
        # score_only: an echo request with max_tokens 0; the engine must sample one token, which is dropped.
        self._score_only = score_only
        self._detok = IncrementalDetokenizer(tokenizer, prompt_token_ids, params.skip_special_tokens)
        self._stops = StopStringMatcher(params.stop, params.include_stop_str_in_output)
        self._include_stop = params.include_stop_str_in_output
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None   # vLLM's field: the stop string or stop token id

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def push(self, out: TokenOutput) -> Delta:
        if self.finished:  # already ended by a stop string; the engine is still producing (n > 1)
            return Delta()
        if out.finish_reason == "error":
            raise APIError(500, f"generation failed: {out.error or 'engine error'}", "server_error",
                           code="engine_error")
        if out.finish_reason == "abort":
            raise APIError(503, "the request was aborted (the server is shutting down)",
                           "service_unavailable_error", code="aborted")
        if self._score_only:
            self.finish_reason = "length"
            return Delta(finish_reason="length")
        ids = list(out.new_token_ids)
        self.token_ids.extend(ids)
        delta = Delta(num_new_tokens=len(ids), logprobs=_logprobs(out))
        text_ids = ids
        # The eos / stop id ends the sample but is not text, unless the client asked for stops in the output.
        if out.stop_token_id is not None and ids and ids[-1] == out.stop_token_id and not self._include_stop:
            text_ids = ids[:-1]
        piece = self._detok.push(text_ids)
        if out.finished:
            piece += self._detok.flush()
        check = self._stops.push(piece)
        delta.text = check.text
        if check.stopped:
            self.finish_reason, self.stop_reason = "stop", check.stop_str
        elif out.finished:
            delta.text += self._stops.flush()
            self.finish_reason = out.finish_reason
            self.stop_reason = out.stop_token_id
        delta.finish_reason = self.finish_reason
        self.text += delta.text
        return delta


def push_output(engine, sample: SampleText, out: TokenOutput) -> Delta:
    """Feed one engine output to its sample. When a stop string ends the sample before the engine has
    (the engine never sees text), tell the engine to stop that sample, so that with n > 1 it does not
    keep generating for it until its siblings finish."""
    was_finished = sample.finished
    delta = sample.push(out)
    if sample.finished and not was_finished and not out.finished:
        engine.stop_sample(out.request_id, out.index)
    return delta


def _logprobs(out: TokenOutput) -> list[TokenLogprob]:
    if out.new_logprobs is None:
        return []
    tops = out.new_top_logprobs or [[] for _ in out.new_token_ids]
    return [TokenLogprob(t, lp, list(top)) for t, lp, top in zip(out.new_token_ids, out.new_logprobs, tops)]


def prompt_logprobs(prompt_token_ids: list[int], raw: list) -> list[TokenLogprob]:
    """The engine's prompt logprobs ([None, (logprob, top) ...], one per prompt token) as TokenLogprobs."""
    assert len(raw) == len(prompt_token_ids), (len(raw), len(prompt_token_ids))
    return [TokenLogprob(t, None, []) if item is None else TokenLogprob(t, item[0], [tuple(x) for x in item[1]])
            for t, item in zip(prompt_token_ids, raw)]


async def merge_streams(streams: list[AsyncIterator[TokenOutput]],
                        timeout_s: float | None = None) -> AsyncIterator[tuple[int, TokenOutput]]:
    """(stream index, output) from several engine requests as they come; leaving early aborts them all.

    Past `timeout_s` the requests are aborted (their KV blocks freed) and a 408 is raised.
    """
    merged = _single(streams[0]) if len(streams) == 1 else _merge(streams)
    try:
        async with contextlib.aclosing(_deadline(merged, timeout_s)) as items:
            async for item in items:
                yield item
    except EngineDeadError as e:
        raise APIError(503, f"the engine is not available: {e}", "service_unavailable_error",
                       code="engine_dead") from None
    except asyncio.TimeoutError:
        raise APIError(408, f"the request ran longer than the server's limit of {timeout_s:g} s and was "
                       "stopped", "timeout_error", code="request_timeout") from None


async def _single(stream: AsyncIterator[TokenOutput]) -> AsyncIterator[tuple[int, TokenOutput]]:
    # The common case: no tasks, the caller's cancellation reaches the stream directly.
    async with contextlib.aclosing(stream) as only:
        async for out in only:
            yield 0, out


async def _deadline(items: AsyncIterator, timeout_s: float | None) -> AsyncIterator:
    """Pass items through until timeout_s has passed since the first wait; then TimeoutError."""
    async with contextlib.aclosing(items):
        if timeout_s is None:
            async for item in items:
                yield item
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            try:
                # NOTE: on timeout wait_for cancels the pending __anext__, which aborts the engine request.
                item = await asyncio.wait_for(anext(items), max(0.0, deadline - loop.time()))
            except StopAsyncIteration:
                return
            yield item


async def _merge(streams: list[AsyncIterator[TokenOutput]]) -> AsyncIterator[tuple[int, TokenOutput]]:
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: AsyncIterator[TokenOutput]) -> None:
        try:
            async with contextlib.aclosing(stream) as s:
                async for out in s:
                    queue.put_nowait((i, out))
        except BaseException as e:  # handed to the consumer, which raises it
            queue.put_nowait((i, e))
            return
        queue.put_nowait((i, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
