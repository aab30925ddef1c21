"""Generation: one HTTP generation request from its engine requests to per-choice text deltas.

The chat and completions handlers parse a request, build a Generation and format what it yields; this
is the one place that runs the engine requests (one per prompt, params.n samples each), feeds their
outputs to the output processor, stops samples a stop string ended, times them for /metrics, enforces
the request timeout, and turns the engine's errors into HTTP ones.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from engine.messages import TokenLogprob, TokenOutput
from engine.output_processor import GenerationError, OutputProcessor, SampleDelta, SampleState
from engine.protocol import EngineDeadError
from engine.sampling_params import SamplingParams
from engine.multimodal import ImageInput
from engine.validation import InvalidRequest, check_request
from launcher.server.errors import APIError
from launcher.server.responses import usage
from launcher.server.served_model import ServedModel

# How the engine's errors reach a client.
_ERRORS = {"engine_error": (500, "server_error"), "aborted": (503, "service_unavailable_error")}
_MESSAGES = {"aborted": "the request was aborted (the server is shutting down)"}


@dataclass(frozen=True, slots=True)
class EnginePrompt:
    """One prompt of a request, ready for the engine: its token ids and final sampling params."""
    token_ids: list[int]
    params: SamplingParams
    images: tuple[ImageInput, ...] = ()   # a vision model's images, placeholders expanded in token_ids


class Generation:
    """The prompts of one request, each an engine request of params.n samples; choice i * n + j is
    sample j of prompt i."""

    def __init__(self, model: ServedModel, request_id: str, prompts: list[EnginePrompt],
                 timeout_s: float | None, *, score_only: bool = False, param: str = "prompt"):
        # score_only: an echo request with max_tokens 0 — the engine samples one token, which is dropped.
        for p in prompts:
            try:
                check_request(p.token_ids, p.params.max_tokens, model.info, param, p.images)
            except InvalidRequest as e:
                raise APIError(400, str(e), param=e.param, code=e.code) from None
        self.model = model
        self.request_id = request_id
        self.created = int(time.time())
        self.prompts = prompts
        self._timeout_s = timeout_s
        self._engine_ids = [f"{request_id}-{i}" for i in range(len(prompts))]
        self._processor = OutputProcessor(model.tokenizer)
        self.samples: list[SampleState] = []   # in choice order
        for i, (rid, p) in enumerate(zip(self._engine_ids, prompts)):
            self.samples += self._processor.add_request(rid, p.token_ids, p.params, first_index=i * p.params.n,
                                                        score_only=score_only)
        self._prompt_of = {rid: i for i, rid in enumerate(self._engine_ids)}
        self._timers = [model.metrics.timer() for _ in prompts]

    async def stream(self) -> AsyncIterator[SampleDelta]:
        """Every output as a delta of its choice, until all choices have finished (a stop string may end
        a choice before the engine does: leaving then aborts what the engine still runs)."""
        client = self.model.client
        streams = [client.generate(rid, p.token_ids, p.params, images=p.images)
                   for rid, p in zip(self._engine_ids, self.prompts)]
        async with contextlib.aclosing(merge_outputs(streams, self._timeout_s)) as outputs:
            async for out in outputs:
                delta = self._processor.process(out)
                if delta is None:
                    continue
                if isinstance(delta, GenerationError):
                    status, kind = _ERRORS[delta.code]
                    raise APIError(status, _MESSAGES.get(delta.code, delta.message), kind, code=delta.code)
                if delta.stops_engine_sample:
                    client.stop_sample(out.request_id, out.index)
                self._timers[self._prompt_of[out.request_id]].tokens(len(delta.token_ids))
                yield delta
                if self._processor.all_finished:
                    break
        for i, timer in enumerate(self._timers):
            samples = self.samples_of(i)
            timer.finish(samples[0].finish_reason or "abort", len(self.prompts[i].token_ids),
                         sum(len(s.token_ids) for s in samples))

    async def run(self) -> None:
        """Generate to the end (the non-streaming answers read self.samples afterwards)."""
        async for _ in self.stream():
            pass

    def samples_of(self, prompt_index: int) -> list[SampleState]:
        return self._processor.samples(self._engine_ids[prompt_index])

    def prompt_logprobs(self, prompt_index: int) -> list[TokenLogprob]:
        """The prompt's token logprobs (requests with params.prompt_logprobs), which come with its first output."""
        entries = self._processor.prompt_logprobs(self._engine_ids[prompt_index])
        if entries is None:
            raise APIError(500, "the engine sent no prompt logprobs", "server_error", code="engine_error")
        return entries

    def usage(self) -> dict:
        return usage(sum(len(p.token_ids) for p in self.prompts), sum(len(s.token_ids) for s in self.samples),
                     sum(self._processor.num_cached_tokens(rid) for rid in self._engine_ids))


async def merge_outputs(streams: list[AsyncIterator], timeout_s: float | None) -> AsyncIterator:
    """Outputs of several engine requests (token or transcription outputs) as they come; leaving early aborts
    them all. Past `timeout_s` the requests are aborted (their KV blocks freed) and a 408 is raised; a dead
    engine is a 503."""
    merged = streams[0] if len(streams) == 1 else _interleave(streams)
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


async def _deadline(items: AsyncIterator, timeout_s: float | None) -> AsyncIterator:
    """Pass items through until timeout_s has passed since the first wait; then TimeoutError."""
    async with contextlib.aclosing(items):
        if timeout_s is None:
            async for item in items:
                yield item
            return
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            try:
                # NOTE: on timeout the pending __anext__ is cancelled, which aborts the engine request.
                item = await _next_by(items, deadline)
            except StopAsyncIteration:
                return
            yield item


if hasattr(asyncio, "timeout_at"):   # Python 3.11+
    async def _next_by(items: AsyncIterator, deadline: float):
        # NOTE: not wait_for, which loses a cancel that lands as the item arrives (3.11: bpo-42130): a cancelled
        # background response then ran to its end, and its cancel call waited for it
        async with asyncio.timeout_at(deadline):
            return await anext(items)
else:   # 3.10 has no asyncio.timeout; its wait_for has the race above
    async def _next_by(items: AsyncIterator, deadline: float):
        return await asyncio.wait_for(anext(items), max(0.0, deadline - asyncio.get_running_loop().time()))


async def _interleave(streams: list[AsyncIterator[TokenOutput]]) -> AsyncIterator[TokenOutput]:
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(stream: AsyncIterator[TokenOutput]) -> None:
        try:
            async with contextlib.aclosing(stream) as s:
                async for out in s:
                    queue.put_nowait(out)
        except BaseException as e:  # handed to the consumer, which raises it
            queue.put_nowait(e)
            return
        queue.put_nowait(done)

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
