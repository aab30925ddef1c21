"""POST /v1/chat/completions: messages through the chat template, text (and tool calls) out."""
from __future__ import annotations

import time
from collections.abc import AsyncIterator

from sanic import HTTPResponse
from sanic.request import Request

from engine.chat_template import ChatTemplateError
from launcher.server.errors import bad_request
from launcher.server.generation import SampleText, TokenLogprob, merge_streams, push_output
from launcher.server.protocol_chat import ChatRequest, parse_chat_request
from launcher.server.responses import json_response, usage
from launcher.server.sse import stream_events
from launcher.server.state import ServerState
from launcher.server.tool_parsers import OutputParser, detect_tool_parser, make_output_parser
from launcher.server.tool_prompt import template_renders_tools, with_tools_as_text

# Template variables a request's chat_template_kwargs may not replace.
_RESERVED_KWARGS = frozenset(("messages", "tools", "add_generation_prompt", "chat_template", "bos_token",
                              "eos_token", "documents"))


def render_chat_prompt(state: ServerState, req: ChatRequest) -> list[int]:
    """The prompt token ids: messages (and tools) rendered by the model's or the profile's template."""
    if not state.chat_template:
        raise bad_request("this model has no chat template; set model.chat_template in the profile, or use "
                          "/v1/completions", "messages")
    reserved = _RESERVED_KWARGS & set(req.chat_template_kwargs)
    if reserved:
        raise bad_request(f"'chat_template_kwargs' may not set {', '.join(sorted(reserved))}", "chat_template_kwargs")
    messages = [_for_template(m, state.content_format) for m in req.messages]
    if req.tools and req.tool_choice != "none" and not template_renders_tools(state.chat_template) \
            and detect_tool_parser(state.chat_template) == "hermes":
        messages = with_tools_as_text(messages, req.tools)
    try:
        text = state.tokenizer.apply_chat_template(
            messages, tools=req.tools, add_generation_prompt=req.add_generation_prompt,
            chat_template=state.chat_template, **req.chat_template_kwargs)
    except (ChatTemplateError, TypeError, ValueError) as e:
        raise bad_request(f"the chat template could not render these messages: {e}", "messages") from None
    if req.continue_final_message:
        text = _cut_after_final(text, messages[-1].get("content") or "")
    ids = state.tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise bad_request("the rendered prompt is empty", "messages")
    return ids


def _for_template(message: dict, content_format: str) -> dict:
    content = message.get("content")
    if content_format == "string":
        if isinstance(content, list):
            content = "\n".join(part["text"] for part in content)
        elif content is None:
            content = ""   # templates concatenate strings; an assistant turn with only tool calls has none
    elif isinstance(content, str):
        content = [{"type": "text", "text": content}]
    return {**message, "content": content}


def _cut_after_final(text: str, final: str | list) -> str:
    """Drop what the template appends after the last message (end-of-turn), so generation continues it."""
    if isinstance(final, list):
        final = "".join(p["text"] for p in final)
    at = text.rfind(final) if final else -1
    return text[:at + len(final)] if at >= 0 else text


async def create_chat_completion(state: ServerState, request: Request, body: dict) -> HTTPResponse | None:
    req = parse_chat_request(body, state.info.vocab_size)
    state.check_model(req.model)
    state.check_generates(req.model)
    prompt_ids = render_chat_prompt(state, req)
    max_tokens = state.resolve_max_tokens(len(prompt_ids), req.sampling.max_tokens, "messages")
    params = req.sampling.to_sampling_params(state.defaults, max_tokens)
    call = _Call(state, req, prompt_ids, params)
    with state.admitted():
        if req.stream:
            await stream_events(request, _stream(state, call))
            return None
        return json_response(await _complete(state, call))


class _Call:
    def __init__(self, state: ServerState, req: ChatRequest, prompt_ids: list[int], params):
        self.req, self.prompt_ids, self.params = req, prompt_ids, params
        self.request_id = state.new_request_id("chatcmpl")
        self.created = int(time.time())
        n = req.sampling.n
        self.samples = [SampleText(state.tokenizer, prompt_ids, params) for _ in range(n)]
        self.parsers: list[OutputParser] = [make_output_parser(state.tokenizer, req) for _ in range(n)]
        self.timer = state.metrics.timer()
        self.num_cached = 0

    def outputs(self, state: ServerState):
        return merge_streams([state.generate(self.request_id, self.prompt_ids, self.params)],
                             state.settings.request_timeout_s)

    def finish_reason(self, i: int) -> str | None:
        reason = self.samples[i].finish_reason
        # OpenAI answers 'stop' when tool_choice names the function, 'tool_calls' when the model chose to call.
        forced = isinstance(self.req.tool_choice, dict)
        return "tool_calls" if reason == "stop" and self.parsers[i].has_tool_calls and not forced else reason

    def usage(self) -> dict:
        return usage(len(self.prompt_ids), sum(len(s.token_ids) for s in self.samples), self.num_cached)

    def finish_metrics(self) -> None:
        self.timer.finish(self.samples[0].finish_reason or "abort", len(self.prompt_ids),
                          sum(len(s.token_ids) for s in self.samples))


async def _complete(state: ServerState, call: _Call) -> dict:
    logprobs: list[list[TokenLogprob]] = [[] for _ in call.samples]
    async for _, out in call.outputs(state):
        delta = push_output(state.engine, call.samples[out.index], out)
        call.timer.tokens(delta.num_new_tokens)
        logprobs[out.index] += delta.logprobs
        if out.finished and out.index == 0:
            call.num_cached = out.num_cached_tokens
        if all(s.finished for s in call.samples):
            break
    call.finish_metrics()
    choices = []
    for i, sample in enumerate(call.samples):
        parsed = call.parsers[i].parse(sample.text)
        message = {"role": "assistant", "content": parsed.content}
        if parsed.tool_calls:
            message["tool_calls"] = parsed.tool_calls
        choices.append({"index": i, "message": message,
                        "logprobs": _logprobs(state, logprobs[i]) if call.params.logprobs is not None else None,
                        "finish_reason": call.finish_reason(i), "stop_reason": sample.stop_reason})
    return {"id": call.request_id, "object": "chat.completion", "created": call.created, "model": call.req.model,
            "choices": choices, "usage": call.usage(), "system_fingerprint": None}


async def _stream(state: ServerState, call: _Call) -> AsyncIterator[dict]:
    req = call.req

    def chunk(choices: list[dict]) -> dict:
        return {"id": call.request_id, "object": "chat.completion.chunk", "created": call.created,
                "model": req.model, "choices": choices, "usage": None, "system_fingerprint": None}

    def choice(i: int, delta: dict, logprobs=None, finish_reason=None) -> dict:
        return {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason,
                **({"stop_reason": call.samples[i].stop_reason} if finish_reason else {})}

    started = False
    async for _, out in call.outputs(state):
        if not started:  # the role goes first, once the engine has accepted the request
            started = True
            for i in range(len(call.samples)):
                yield chunk([choice(i, {"role": "assistant", "content": ""})])
        i = out.index
        delta = push_output(state.engine, call.samples[i], out)
        call.timer.tokens(delta.num_new_tokens)
        if out.finished and i == 0:
            call.num_cached = out.num_cached_tokens
        pieces = call.parsers[i].feed(delta.text)
        if delta.finish_reason is not None:
            pieces += call.parsers[i].finish()
        lp = {"content": _logprobs_list(state, delta.logprobs)} \
            if call.params.logprobs is not None and delta.logprobs else None
        if lp is not None and not pieces:
            pieces = [{"content": ""}]   # logprobs of tokens whose text is still held back
        for k, piece in enumerate(pieces):
            yield chunk([choice(i, piece, lp if k == 0 else None)])
        if delta.finish_reason is not None:
            yield chunk([choice(i, {}, None, call.finish_reason(i))])
        if all(s.finished for s in call.samples):
            break
    call.finish_metrics()
    if req.include_usage:
        yield {**chunk([]), "usage": call.usage()}


def _logprobs(state: ServerState, entries: list[TokenLogprob]) -> dict:
    return {"content": _logprobs_list(state, entries)}


def _logprobs_list(state: ServerState, entries: list[TokenLogprob]) -> list[dict]:
    """OpenAI's chat logprobs: per token its text, logprob, UTF-8 bytes and the top alternatives."""
    tok = state.tokenizer

    def entry(token_id: int, logprob: float) -> dict:
        text = tok.decode([token_id], skip_special_tokens=False)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return [{**entry(e.token_id, e.logprob), "top_logprobs": [entry(t, lp) for t, lp in e.top]} for e in entries]
