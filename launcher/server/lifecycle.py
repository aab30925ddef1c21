"""Server lifecycle: start the engine after the port is up, watch it, shut it down with the server."""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from sanic import Sanic

from engine.protocol import EngineStartupError

log = logging.getLogger("llm.server")


def install(app: Sanic) -> None:
    app.register_listener(_after_start, "after_server_start")
    app.register_listener(_before_stop, "before_server_stop")
    app.register_listener(_after_stop, "after_server_stop")


async def _after_start(app: Sanic) -> None:
    # NOTE: the port is already answering here, so /health/ready reports each startup phase.
    app.add_task(_start_engine(app), name="llm-engine-start")


async def _start_engine(app: Sanic) -> None:
    state = app.ctx.state
    try:
        await state.start()
    except asyncio.CancelledError:
        return  # stopped during startup
    except EngineStartupError as e:
        _fail(app, f"the engine could not start: {e}")
        return
    except Exception as e:  # the tokenizer or chat template could not load
        log.exception("startup failed")
        _fail(app, f"startup failed: {type(e).__name__}: {e}")
        return
    for model in state.registry.models:
        if not model.is_ready:
            log.info("ready: %s loads on its first request", ", ".join(model.names))
            continue
        info = model.info
        log.info("ready: serving %s on %s (%s), max_model_len %d, KV cache %d tokens, startup %.1fs",
                 ", ".join(model.names), info.device, info.dtype, info.max_model_len, info.kv_capacity_tokens,
                 state.ready_seconds)
    for upstream in state.registry.upstreams:
        log.info("ready: routing to upstream %s (%s) at %s", upstream.name, upstream.provider.engine,
                 upstream.settings.base_url)
    try:
        while True:  # an engine process dying later is fatal too: exit so a supervisor can restart us
            await asyncio.sleep(0.5)
            if state.registry.error is not None and not state.shutting_down:
                _fail(app, f"the engine process failed: {state.registry.error}")
                return
    except asyncio.CancelledError:
        return  # the server is stopping


def _fail(app: Sanic, message: str) -> None:
    state = app.ctx.state
    log.error("%s", message)
    if state.settings.status_file:
        Path(state.settings.status_file).write_text(message, encoding="utf-8")
    state.exit_code = 1
    state.fatal_error = message
    if state.settings.exit_on_engine_failure:
        app.stop()


async def _before_stop(app: Sanic) -> None:
    app.ctx.state.shutting_down = True   # new requests get 503 while in-flight ones drain


async def _after_stop(app: Sanic) -> None:
    await app.ctx.state.registry.shutdown()
