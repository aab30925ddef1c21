"""POST /v1/completions: prompts in, text out (streaming or not), OpenAI's legacy completions shape."""
from __future__ import annotations

from collections.abc import AsyncIterator

from sanic import HTTPResponse
from sanic.request import Request

from engine.messages import TokenLogprob
from launcher.server.errors import bad_request
from launcher.server.generation import EnginePrompt, Generation
from launcher.server.protocol import CompletionRequest, parse_completion_request
from launcher.server.responses import json_response
from launcher.server.served_model import ServedModel
from launcher.server.sse import stream_events
from launcher.server.state import ServerState

OPENAI_DEFAULT_MAX_TOKENS = 16   # the completions API's default (chat's is the rest of the context)


async def create_completion(state: ServerState, model: ServedModel, request: Request,
                            body: dict) -> HTTPResponse | None:
    model.check_generates()
    req = parse_completion_request(body, model.info.vocab_size)
    prompt_ids, prompt_texts = _encode(model, req)
    requested = req.sampling.max_tokens
    if requested is None and "max_tokens" not in model.defaults:
        requested = OPENAI_DEFAULT_MAX_TOKENS
    # echo with max_tokens 0 scores the prompt: the engine still samples one token, which is dropped.
    score_only = req.echo and requested == 0
    if score_only:
        requested = 1
    prompts = [EnginePrompt(ids, req.sampling.to_sampling_params(
        model.defaults, model.resolve_max_tokens(len(ids), requested))) for ids in prompt_ids]
    gen = Generation(model, state.new_request_id("cmpl"), prompts, state.settings.request_timeout_s,
                     score_only=score_only)
    with state.admitted():
        if req.stream:
            await stream_events(request, _stream(model, req, gen, prompt_texts))
            return None
        await gen.run()
        return json_response(_completion(model, req, gen, prompt_texts))


def _encode(model: ServedModel, req: CompletionRequest) -> tuple[list[list[int]], list[str]]:
    """Each prompt's token ids, and its text (what echo prepends)."""
    tok = model.tokenizer
    ids_list, texts = [], []
    for prompt in req.prompts:
        ids = tok.encode(prompt, add_special_tokens=req.add_special_tokens) if isinstance(prompt, str) \
            else list(prompt)
        if not ids:
            raise bad_request("the prompt is empty (it encodes to no tokens)", "prompt")
        ids_list.append(ids)
        texts.append(prompt if isinstance(prompt, str) else tok.decode(ids, skip_special_tokens=False))
    return ids_list, texts


def _scores_prompt(req: CompletionRequest) -> bool:
    """echo + logprobs: the logprobs cover the prompt's tokens too (the engine's prompt logprobs)."""
    return req.echo and req.sampling.logprobs is not None


def _completion(model: ServedModel, req: CompletionRequest, gen: Generation, prompt_texts: list[str]) -> dict:
    choices = []
    for sample in gen.samples:
        prompt_i = sample.index // req.sampling.n
        prefix = prompt_texts[prompt_i] if req.echo else ""
        # with echo the prompt's tokens come first, so offsets count from 0 (prompt tokens, then generated)
        entries, offset = (gen.prompt_logprobs(prompt_i) + sample.logprobs, 0) if _scores_prompt(req) \
            else (sample.logprobs, len(prefix))
        choices.append({"index": sample.index, "text": prefix + sample.text,
                        "logprobs": _logprobs(model, entries, offset) if req.sampling.logprobs is not None else None,
                        "finish_reason": sample.finish_reason, "stop_reason": sample.stop_reason})
    return {"id": gen.request_id, "object": "text_completion", "created": gen.created, "model": req.model,
            "choices": choices, "usage": gen.usage(), "system_fingerprint": None}


async def _stream(model: ServedModel, req: CompletionRequest, gen: Generation,
                  prompt_texts: list[str]) -> AsyncIterator[dict]:
    offsets = [0] * len(gen.samples)
    echoed = [False] * len(gen.samples)

    def chunk(choices: list[dict]) -> dict:
        return {"id": gen.request_id, "object": "text_completion", "created": gen.created, "model": req.model,
                "choices": choices, "usage": None, "system_fingerprint": None}

    async for delta in gen.stream():
        index = delta.index
        text, entries = delta.text, delta.logprobs
        if req.echo and not echoed[index]:
            prompt_i = index // req.sampling.n
            text, echoed[index] = prompt_texts[prompt_i] + text, True
            if _scores_prompt(req):
                entries = gen.prompt_logprobs(prompt_i) + entries
        if not text and delta.finish_reason is None and not entries:
            continue
        lp = _logprobs(model, entries, offsets[index]) if req.sampling.logprobs is not None else None
        offsets[index] += len(text)
        # NOTE: a sample already ended by a stop string gets an empty delta (skipped above) for any further
        # engine output (n > 1), so each choice reports its finish exactly once.
        yield chunk([{"index": index, "text": text, "logprobs": lp, "finish_reason": delta.finish_reason,
                      "stop_reason": delta.stop_reason if delta.finish_reason else None}])
    if req.include_usage:
        yield {**chunk([]), "usage": gen.usage()}


def _logprobs(model: ServedModel, entries: list[TokenLogprob], text_offset: int) -> dict:
    """OpenAI's completions logprobs: parallel lists of tokens, their logprobs, top alternatives, offsets
    (a prompt's first token, which nothing predicts, has null for its logprob and alternatives)."""
    tok = model.tokenizer
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
