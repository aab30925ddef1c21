"""Server-sent events exactly as OpenAI streams them: `data: {json}\n\n` per event, then `data: [DONE]\n\n`
(the Responses API's typed events: `event: <type>\ndata: {json}\n\n`, numbered, no [DONE])."""
from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Callable

import orjson
from sanic.request import Request

from launcher.server.errors import APIError

log = logging.getLogger("llm.server")

DONE = b"data: [DONE]\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}   # no proxy buffering of the stream


def event(obj: dict) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def typed_events() -> Callable[[dict], bytes]:
    """An encoder for one Responses stream: each event under its `type`, with sequence_number 0, 1, 2, ..."""
    numbers = itertools.count()

    def encode(obj: dict) -> bytes:
        obj = {**obj, "sequence_number": next(numbers)}
        return b"event: " + obj["type"].encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"
    return encode


def typed_error(e: APIError) -> dict:
    """The Responses stream's error event."""
    return {"type": "error", "code": e.code, "message": e.message, "param": e.param}


async def stream_events(request: Request, events: AsyncIterator[dict], encode: Callable[[dict], bytes] = event,
                        error: Callable[[APIError], dict] = APIError.body, done: bytes = DONE) -> None:
    """Send `events` as SSE. The first event is pulled before the 200 goes out, so an error that comes
    before any output is still a plain HTTP error; an error after that becomes a final `{"error": ...}`
    event (`error(e)`), then [DONE] (`done`; empty: nothing)."""
    try:
        first = await anext(events)
    except StopAsyncIteration:
        first = None
    response = await request.respond(content_type="text/event-stream; charset=utf-8", headers=HEADERS)
    try:
        if first is not None:
            await response.send(encode(first))
            async for item in events:
                await response.send(encode(item))
    except asyncio.CancelledError:
        raise  # the client went away: the generator's cleanup aborts the engine request
    except APIError as e:
        await response.send(encode(error(e)))
    except Exception as e:  # a bug mid-stream: the client still gets a well-formed end
        log.exception("error while streaming %s", request.path)
        await response.send(encode(error(APIError(500, f"internal server error: {type(e).__name__}",
                                                  "server_error", code="internal_error"))))
    finally:
        await events.aclose()
    if done:
        await response.send(done)
    await response.eof()
