"""Server-sent events exactly as OpenAI streams them: `data: {json}\n\n` per event, then `data: [DONE]\n\n`."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import orjson
from sanic.request import Request

from launcher.server.errors import APIError

log = logging.getLogger("llm.server")

DONE = b"data: [DONE]\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}   # no proxy buffering of the stream


def event(obj: dict) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


async def stream_events(request: Request, events: AsyncIterator[dict]) -> None:
    """Send `events` as SSE. The first event is pulled before the 200 goes out, so an error that comes
    before any output is still a plain HTTP error; an error after that becomes a final `{"error": ...}`
    event, then [DONE]."""
    try:
        first = await anext(events)
    except StopAsyncIteration:
        first = None
    response = await request.respond(content_type="text/event-stream; charset=utf-8", headers=HEADERS)
    try:
        if first is not None:
            await response.send(event(first))
            async for item in events:
                await response.send(event(item))
    except asyncio.CancelledError:
        raise  # the client went away: the generator's cleanup aborts the engine request
    except APIError as e:
        await response.send(event(e.body()))
    except Exception as e:  # a bug mid-stream: the client still gets a well-formed end
        log.exception("error while streaming %s", request.path)
        await response.send(event(APIError(500, f"internal server error: {type(e).__name__}", "server_error",
                                           code="internal_error").body()))
    finally:
        await events.aclose()
    await response.send(DONE)
    await response.eof()
