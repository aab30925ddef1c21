"""POST /v1/responses (and GET / DELETE / cancel / input_items): a Responses request runs as a chat completion —
the same prompt rendering, Generation, tool-call parsers and structured outputs — answered in Responses' shape."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from sanic import HTTPResponse
from sanic.request import Request

from engine.multimodal import ProcessedImage
from launcher.server.chat_images import chat_images, place_images
from launcher.server.chat_prompt import render_chat_prompt
from launcher.server.errors import APIError, bad_request
from launcher.server.fields import Fields
from launcher.server.generation import EnginePrompt, Generation
from launcher.server.protocol_chat import ChatRequest, parse_chat_request
from launcher.server.protocol_responses import ResponsesRequest, items_to_messages, new_item_id, \
    parse_responses_request
from launcher.server.response_store import ResponseStore, StoredResponse
from launcher.server.responses import json_response
from launcher.server.responses_output import OutputBuilder
from launcher.server.served_model import ServedModel
from launcher.server.serving_chat import chat_logprobs
from launcher.server.sse import stream_events, typed_error, typed_events
from launcher.server.state import ServerState
from launcher.server.tool_parsers import make_output_parser

log = logging.getLogger("llm.server")


async def create_response(state: ServerState, model: ServedModel, request: Request, body: dict) -> HTTPResponse | None:
    model.check_generates()
    req = parse_responses_request(body)
    history = _history(state.responses, req.previous_response_id)
    chat = parse_chat_request(req.chat_body(items_to_messages(req.instructions, history + req.input_items)),
                              model.info.vocab_size)
    images = await chat_images(state, model, chat.messages, "input")
    run = _Run(state, model, req, chat, history, images)
    if req.background:
        record = StoredResponse(run.snapshot("queued"), req.input_items)
        state.responses.put(record)
        record.task = asyncio.create_task(_background(state, model, run, record))
        return json_response(record.response)
    with state.admitted():
        if req.stream:
            await stream_events(request, run.events(), encode=typed_events(), error=typed_error, done=b"")
            return None
        await run.gen.run()
        return json_response(run.finish())


class _Run:
    """One response: its Generation (one sample), the parser reading tool calls, and the items it builds."""

    def __init__(self, state: ServerState, model: ServedModel, req: ResponsesRequest, chat: ChatRequest,
                 history: list[dict], images: list[ProcessedImage]):
        self.state, self.model, self.req, self.history = state, model, req, history
        self.id = new_item_id("resp")
        prompt_ids, placed = place_images(model, render_chat_prompt(model, chat), images)
        max_tokens = model.resolve_max_tokens(len(prompt_ids), chat.sampling.max_tokens, "input")
        params = chat.sampling.to_sampling_params(model.defaults, max_tokens)
        self.gen = Generation(model, self.id, [EnginePrompt(prompt_ids, params, placed)],
                              state.settings.request_timeout_s, param="input")
        self.sampling = {"temperature": params.temperature, "top_p": params.top_p}
        self.parser = make_output_parser(model.tokenizer, chat, model.chat_template)
        self.builder = OutputBuilder((lambda e: chat_logprobs(model, e)) if req.want_logprobs else None)
        self.created_at = int(time.time())

    @property
    def status(self) -> str:
        return "incomplete" if self.gen.samples[0].finish_reason == "length" else "completed"

    def snapshot(self, status: str, error: dict | None = None) -> dict:
        """The Response object now (OpenAI's fields; what we do not do is null or its neutral value)."""
        req, done = self.req, status not in ("queued", "in_progress")
        usage = self.gen.usage() if done else None
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "background": req.background, "completed_at": int(time.time()) if status == "completed" else None,
            "error": error, "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" and
            self.gen.samples[0].finish_reason == "length" else None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens, "max_tool_calls": None,
            "metadata": req.metadata, "model": req.model, "output": self.builder.items if done else [],
            "parallel_tool_calls": req.parallel_tool_calls, "previous_response_id": req.previous_response_id,
            "reasoning": {"effort": None, "summary": None}, "service_tier": "default", "store": req.store,
            **self.sampling, "text": {"format": req.text_format}, "tool_choice": req.tool_choice, "tools": req.tools,
            "top_logprobs": req.top_logprobs, "truncation": "disabled", "user": req.user,
            "usage": None if usage is None else {
                "input_tokens": usage["prompt_tokens"],
                "input_tokens_details": {"cached_tokens": usage["prompt_tokens_details"]["cached_tokens"]},
                "output_tokens": usage["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": usage["total_tokens"]}}

    def finish(self, status: str | None = None) -> dict:
        """Non-streaming: the whole text through the parser and the builder at once; stored if asked."""
        sample = self.gen.samples[0]
        status = status or self.status
        self.builder.feed(self.parser.feed(sample.text) + self.parser.finish(), sample.logprobs)
        self.builder.finish("incomplete" if status != "completed" else "completed")
        return self.done(status)

    def done(self, status: str, error: dict | None = None) -> dict:
        response = self.snapshot(status, error)
        if self.req.store:
            record = self.state.responses.get(self.id) or StoredResponse(response, self.req.input_items)
            record.response = response
            record.history = self.history + self.req.input_items + self.builder.items
            self.state.responses.put(record)
        return response

    async def events(self) -> AsyncIterator[dict]:
        """The typed stream, in OpenAI's order: created, in_progress, then per item added / deltas / done, then
        completed or incomplete. `created` waits for the first output, so an early error is a plain HTTP one."""
        started = False
        try:
            async for delta in self.gen.stream():
                if not started:
                    started = True
                    yield {"type": "response.created", "response": self.snapshot("in_progress")}
                    yield {"type": "response.in_progress", "response": self.snapshot("in_progress")}
                pieces = self.parser.feed(delta.text) + (self.parser.finish() if delta.finish_reason else [])
                for event in self.builder.feed(pieces, delta.logprobs):
                    yield event
        except APIError as e:
            if not started:
                raise
            yield typed_error(e)
            yield {"type": "response.failed", "response": self.done("failed", _error(e))}
            return
        status = self.status
        for event in self.builder.finish(status):
            yield event
        yield {"type": f"response.{status}", "response": self.done(status)}


def _error(e: APIError) -> dict:
    return {"code": "server_error" if e.status >= 500 else (e.code or "invalid_prompt"), "message": e.message}


async def _background(state: ServerState, model: ServedModel, run: _Run, record: StoredResponse) -> None:
    """A background response's run; cancel() on this task aborts the engine request (its KV blocks are freed)."""
    try:
        async with state.registry.using(model):
            with state.admitted():
                record.response = run.snapshot("in_progress")
                await run.gen.run()
        run.finish()
    except asyncio.CancelledError:
        run.finish("cancelled")
    except APIError as e:
        run.done("failed", _error(e))
    except Exception as e:   # a bug: the response still ends (a running one would never leave the store)
        log.exception("background response %s failed", run.id)
        run.done("failed", {"code": "server_error", "message": f"internal server error: {type(e).__name__}"})
    finally:
        record.task = None


def _history(store: ResponseStore, previous_id: str | None) -> list[dict]:
    if previous_id is None:
        return []
    record = store.get(previous_id)
    if record is None:
        raise APIError(404, f"Previous response with id '{previous_id}' not found.", param="previous_response_id",
                       code="previous_response_not_found")
    if record.is_running:
        raise bad_request(f"Previous response '{previous_id}' is still {record.response['status']}: wait for it "
                          "to finish", "previous_response_id")
    return list(record.history)


def _stored(state: ServerState, response_id: str) -> StoredResponse:
    record = state.responses.get(response_id)
    if record is None:
        raise APIError(404, f"Response with id '{response_id}' not found.", param="response_id", code="not_found")
    return record


async def retrieve_response(state: ServerState, response_id: str) -> HTTPResponse:
    return json_response(_stored(state, response_id).response)


async def delete_response(state: ServerState, response_id: str) -> HTTPResponse:
    record = _stored(state, response_id)
    await _cancel(record)
    state.responses.delete(response_id)
    return json_response({"id": response_id, "object": "response", "deleted": True})


async def cancel_response(state: ServerState, response_id: str) -> HTTPResponse:
    record = _stored(state, response_id)
    if not record.response.get("background"):
        raise bad_request("Only responses created with background=true can be cancelled.", "response_id")
    await _cancel(record)
    return json_response(record.response)


async def _cancel(record: StoredResponse) -> None:
    task = record.task
    if task is not None and not task.done():
        task.cancel()
        await asyncio.wait({task})


async def list_input_items(state: ServerState, request: Request, response_id: str) -> HTTPResponse:
    """OpenAI's list: newest first unless order=asc; `limit` (1-100, default 20) and `after` (an item id)."""
    items = list(_stored(state, response_id).input_items)
    f = Fields({k: request.args.get(k) for k in request.args})
    order = f.str("order", "desc", choices=("asc", "desc"))
    limit = f.str("limit", "20")
    if not limit.isdigit() or not 1 <= int(limit) <= 100:
        raise bad_request("'limit' must be an integer between 1 and 100", "limit")
    if order == "desc":
        items.reverse()
    after = f.str("after")
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise bad_request(f"'after': no input item with id {after!r}", "after")
        items = items[ids.index(after) + 1:]
    page = items[:int(limit)]
    return json_response({"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                          "last_id": page[-1]["id"] if page else None, "has_more": len(items) > len(page)})
