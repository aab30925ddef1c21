"""POST /v1/chat/completions: parse, render the prompt, run a Generation, answer in OpenAI's chat shape."""
from __future__ import annotations

from collections.abc import AsyncIterator

from sanic import HTTPResponse
from sanic.request import Request

from engine.messages import TokenLogprob
from engine.output_processor import SampleState
from launcher.server.chat_images import chat_images, place_images
from launcher.server.chat_prompt import render_chat_prompt
from launcher.server.generation import EnginePrompt, Generation
from launcher.server.protocol_chat import ChatRequest, parse_chat_request
from launcher.server.responses import json_response
from launcher.server.served_model import ServedModel
from launcher.server.sse import stream_events
from launcher.server.state import ServerState
from launcher.server.tool_parsers import OutputParser, make_output_parser


async def create_chat_completion(state: ServerState, model: ServedModel, request: Request,
                                 body: dict) -> HTTPResponse | None:
    model.check_generates()
    req = parse_chat_request(body, model.info.vocab_size)
    images = await chat_images(state, model, req.messages)
    prompt_ids, placed = place_images(model, render_chat_prompt(model, req), images)
    max_tokens = model.resolve_max_tokens(len(prompt_ids), req.sampling.max_tokens, "messages")
    params = req.sampling.to_sampling_params(model.defaults, max_tokens)
    gen = Generation(model, state.new_request_id("chatcmpl"), [EnginePrompt(prompt_ids, params, placed)],
                     state.settings.request_timeout_s, param="messages")
    parsers = [make_output_parser(model.tokenizer, req, model.chat_template) for _ in gen.samples]
    with state.admitted():
        if req.stream:
            await stream_events(request, _stream(model, req, gen, parsers))
            return None
        await gen.run()
        return json_response(_completion(model, req, gen, parsers))


def _finish_reason(req: ChatRequest, sample: SampleState, parser: OutputParser) -> str | None:
    # OpenAI answers 'stop' when tool_choice names the function, 'tool_calls' when the model chose to call.
    forced = isinstance(req.tool_choice, dict)
    return "tool_calls" if sample.finish_reason == "stop" and parser.has_tool_calls and not forced \
        else sample.finish_reason


def _completion(model: ServedModel, req: ChatRequest, gen: Generation, parsers: list[OutputParser]) -> dict:
    choices = []
    for sample, parser in zip(gen.samples, parsers):
        parsed = parser.parse(sample.text)
        message = {"role": "assistant", "content": parsed.content}
        if parsed.tool_calls:
            message["tool_calls"] = parsed.tool_calls
        logprobs = {"content": chat_logprobs(model, sample.logprobs)} if req.sampling.logprobs is not None else None
        choices.append({"index": sample.index, "message": message, "logprobs": logprobs,
                        "finish_reason": _finish_reason(req, sample, parser), "stop_reason": sample.stop_reason})
    return {"id": gen.request_id, "object": "chat.completion", "created": gen.created, "model": req.model,
            "choices": choices, "usage": gen.usage(), "system_fingerprint": None}


async def _stream(model: ServedModel, req: ChatRequest, gen: Generation,
                  parsers: list[OutputParser]) -> AsyncIterator[dict]:
    def chunk(choices: list[dict]) -> dict:
        return {"id": gen.request_id, "object": "chat.completion.chunk", "created": gen.created,
                "model": req.model, "choices": choices, "usage": None, "system_fingerprint": None}

    def choice(i: int, delta: dict, logprobs=None, finish_reason=None) -> dict:
        return {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason,
                **({"stop_reason": gen.samples[i].stop_reason} if finish_reason else {})}

    started = False
    async for delta in gen.stream():
        if not started:  # the role goes first, once the engine has accepted the request
            started = True
            for i in range(len(gen.samples)):
                yield chunk([choice(i, {"role": "assistant", "content": ""})])
        i, parser = delta.index, parsers[delta.index]
        pieces = parser.feed(delta.text)
        if delta.finish_reason is not None:
            pieces += parser.finish()
        lp = {"content": chat_logprobs(model, delta.logprobs)} \
            if req.sampling.logprobs is not None and delta.logprobs else None
        if lp is not None and not pieces:
            pieces = [{"content": ""}]   # logprobs of tokens whose text is still held back
        for k, piece in enumerate(pieces):
            yield chunk([choice(i, piece, lp if k == 0 else None)])
        if delta.finish_reason is not None:
            yield chunk([choice(i, {}, None, _finish_reason(req, gen.samples[i], parser))])
    if req.include_usage:
        yield {**chunk([]), "usage": gen.usage()}


def chat_logprobs(model: ServedModel, entries: list[TokenLogprob]) -> list[dict]:
    """OpenAI's chat logprobs: per token its text, logprob, UTF-8 bytes and the top alternatives."""
    tok = model.tokenizer

    def entry(token_id: int, logprob: float) -> dict:
        text = tok.decode([token_id], skip_special_tokens=False)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return [{**entry(e.token_id, e.logprob), "top_logprobs": [entry(t, lp) for t, lp in e.top]} for e in entries]
