"""POST /v1/completions: prompts in, text out (streaming or not), OpenAI's legacy completions shape."""
from __future__ import annotations

import time
from collections.abc import AsyncIterator

from sanic import HTTPResponse
from sanic.request import Request

from engine.messages import TokenOutput
from launcher.server.errors import APIError, bad_request
from launcher.server.generation import (Delta, SampleText, TokenLogprob, merge_streams, prompt_logprobs,
                                        push_output)
from launcher.server.protocol import CompletionRequest, parse_completion_request
from launcher.server.responses import json_response, usage
from launcher.server.sse import stream_events
from launcher.server.state import ServerState

OPENAI_DEFAULT_MAX_TOKENS = 16   # the completions API's default (chat's is the rest of the context)


class _Prepared:
    """A validated completions request: token ids and sampling params per prompt."""

    def __init__(self, state: ServerState, req: CompletionRequest):
        tok = state.tokenizer
        self.req = req
        self.prompt_ids: list[list[int]] = []
        self.prompt_texts: list[str] = []
        for prompt in req.prompts:
            ids = tok.encode(prompt, add_special_tokens=req.add_special_tokens) if isinstance(prompt, str) \
                else list(prompt)
            if not ids:
                raise bad_request("the prompt is empty (it encodes to no tokens)", "prompt")
            self.prompt_ids.append(ids)
            self.prompt_texts.append(prompt if isinstance(prompt, str) else tok.decode(ids, skip_special_tokens=False))
        requested = req.sampling.max_tokens
        if requested is None and "max_tokens" not in state.defaults:
            requested = OPENAI_DEFAULT_MAX_TOKENS
        # echo with max_tokens 0 scores the prompt: the engine still samples one token, which is dropped.
        self.score_only = req.echo and requested == 0
        if self.score_only:
            requested = 1
        # echo + logprobs: the logprobs cover the prompt's tokens too (the engine's prompt logprobs).
        self.scores_prompt = req.echo and req.sampling.logprobs is not None
        self._prompt_logprobs: dict[int, list[TokenLogprob]] = {}
        self.params = [req.sampling.to_sampling_params(state.defaults, state.resolve_max_tokens(len(ids), requested))
                       for ids in self.prompt_ids]
        self.request_id = state.new_request_id("cmpl")
        self.created = int(time.time())
        n = req.sampling.n
        self.samples = [SampleText(tok, ids, p, self.score_only)
                        for ids, p in zip(self.prompt_ids, self.params) for _ in range(n)]
        self.timers = [state.metrics.timer() for _ in self.prompt_ids]

    def streams(self, state: ServerState):
        return [state.generate(f"{self.request_id}-{i}", ids, p)
                for i, (ids, p) in enumerate(zip(self.prompt_ids, self.params))]

    def note(self, prompt_index: int, out: TokenOutput) -> None:
        """Keep the prompt logprobs that a request's first output carries (shared by its n samples)."""
        if out.prompt_logprobs is not None:
            self._prompt_logprobs[prompt_index] = prompt_logprobs(self.prompt_ids[prompt_index], out.prompt_logprobs)

    def echo_logprobs(self, prompt_index: int) -> list[TokenLogprob]:
        """The prompt's token logprobs when echo + logprobs asked for them, else nothing."""
        if not self.scores_prompt:
            return []
        if prompt_index not in self._prompt_logprobs:
            raise APIError(500, "the engine sent no prompt logprobs", "server_error", code="engine_error")
        return self._prompt_logprobs[prompt_index]

    def choice_index(self, prompt_index: int, sample_index: int) -> int:
        return prompt_index * self.req.sampling.n + sample_index

    def usage(self, num_cached: int) -> dict:
        num_prompt = sum(len(ids) for ids in self.prompt_ids)
        return usage(num_prompt, sum(len(s.token_ids) for s in self.samples), num_cached)

    def finish_metrics(self) -> None:
        n = self.req.sampling.n
        for i, timer in enumerate(self.timers):
            samples = self.samples[i * n:(i + 1) * n]
            timer.finish(samples[0].finish_reason or "abort", len(self.prompt_ids[i]),
                         sum(len(s.token_ids) for s in samples))


async def create_completion(state: ServerState, request: Request, body: dict) -> HTTPResponse | None:
    req = parse_completion_request(body, state.info.vocab_size)
    state.check_model(req.model)
    state.check_generates(req.model)
    prepared = _Prepared(state, req)
    with state.admitted():
        if req.stream:
            await stream_events(request, _stream(state, prepared))
            return None
        return json_response(await _complete(state, prepared))


async def _complete(state: ServerState, p: _Prepared) -> dict:
    logprobs: dict[int, list[TokenLogprob]] = {i: [] for i in range(len(p.samples))}
    num_cached = 0
    async for prompt_i, out in merge_streams(p.streams(state), state.settings.request_timeout_s):
        p.note(prompt_i, out)
        index = p.choice_index(prompt_i, out.index)
        delta = push_output(state.engine, p.samples[index], out)
        p.timers[prompt_i].tokens(delta.num_new_tokens)
        logprobs[index] += delta.logprobs
        if out.finished and out.index == 0:  # one count per prompt, not per sample
            num_cached += out.num_cached_tokens
        if all(s.finished for s in p.samples):
            break  # leaving aborts what the engine still runs for samples ended by stop strings
    p.finish_metrics()
    choices = []
    for index, sample in enumerate(p.samples):
        prompt_i = index // p.req.sampling.n
        prefix = p.prompt_texts[prompt_i] if p.req.echo else ""
        # with echo the prompt's tokens come first, so offsets count from 0 (prompt tokens, then generated)
        entries, offset = (p.echo_logprobs(prompt_i) + logprobs[index], 0) if p.scores_prompt \
            else (logprobs[index], len(prefix))
        choices.append({"index": index, "text": prefix + sample.text,
                        "logprobs": _logprobs(state, entries, offset) if p.req.sampling.logprobs is not None else None,
                        "finish_reason": sample.finish_reason, "stop_reason": sample.stop_reason})
    return {"id": p.request_id, "object": "text_completion", "created": p.created, "model": p.req.model,
            "choices": choices, "usage": p.usage(num_cached), "system_fingerprint": None}


async def _stream(state: ServerState, p: _Prepared) -> AsyncIterator[dict]:
    req = p.req
    offsets = [0] * len(p.samples)
    echoed = [False] * len(p.samples)
    num_cached = 0

    def chunk(choices: list[dict]) -> dict:
        return {"id": p.request_id, "object": "text_completion", "created": p.created, "model": req.model,
                "choices": choices, "usage": None, "system_fingerprint": None}

    async for prompt_i, out in merge_streams(p.streams(state), state.settings.request_timeout_s):
        p.note(prompt_i, out)
        index = p.choice_index(prompt_i, out.index)
        sample = p.samples[index]
        delta: Delta = push_output(state.engine, sample, out)
        p.timers[prompt_i].tokens(delta.num_new_tokens)
        if out.finished and out.index == 0:  # one count per prompt, not per sample
            num_cached += out.num_cached_tokens
        text, entries = delta.text, delta.logprobs
        if req.echo and not echoed[index]:
            text, echoed[index] = p.prompt_texts[prompt_i] + text, True
            entries = p.echo_logprobs(prompt_i) + entries
        if not text and delta.finish_reason is None and not entries:
            continue
        lp = _logprobs(state, entries, offsets[index]) if req.sampling.logprobs is not None else None
        offsets[index] += len(text)
        choice = {"index": index, "text": text, "logprobs": lp, "finish_reason": delta.finish_reason,
                  "stop_reason": sample.stop_reason if delta.finish_reason else None}
        # NOTE: a sample already ended by a stop string gets an empty Delta (skipped above) for any further
        # engine output (n > 1), so each choice reports its finish exactly once.
        yield chunk([choice])
        if all(s.finished for s in p.samples):
            break  # every sample is done (a stop string may end one before the engine does)
    p.finish_metrics()
    if req.include_usage:
        yield {**chunk([]), "usage": p.usage(num_cached)}


def _logprobs(state: ServerState, entries: list[TokenLogprob], text_offset: int) -> dict:
    """OpenAI's completions logprobs: parallel lists of tokens, their logprobs, top alternatives, offsets
    (a prompt's first token, which nothing predicts, has null for its logprob and alternatives)."""
    tok = state.tokenizer
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    offset = text_offset
    for e in entries:
        text = tok.decode([e.token_id], skip_special_tokens=False)
        tokens.append(text)
        token_logprobs.append(e.logprob)
        if e.logprob is None:
            top_logprobs.append(None)
        else:
            top = {tok.decode([t], skip_special_tokens=False): lp for t, lp in e.top}
            top.setdefault(text, e.logprob)   # as vLLM: the chosen token is always among the alternatives
            top_logprobs.append(top)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}
