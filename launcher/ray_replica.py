"""One Ray Serve replica: our Sanic app with its own engine process, behind Serve's HTTP proxy (ray_serve.py)."""
from __future__ import annotations

import asyncio
import dataclasses
import re

from launcher.server.settings import LaunchSpec
from launcher.server.state import ServerState

_POLL_S = 0.1


class ReplicaASGI:
    """The Sanic app as Serve calls it. Two adjustments, both at the ASGI boundary:
    - Serve pickles every ASGI message between the replica and the proxy, and Sanic hands over its response
      headers as a generator (every request was a 500), so headers are listed on the way out;
    - lifespan startup completes only once the engine is ready (or fails with the engine's error), so Serve
      counts a replica as started, and routes to it, only when it can serve."""

    def __init__(self, app, state: ServerState):
        self._app = app
        self._state = state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await self._app(scope, receive, self._held_startup(send))
            return

        async def listed(message: dict) -> None:
            if "headers" in message:
                message = {**message, "headers": list(message["headers"])}
            await send(message)

        await self._app(scope, receive, listed)

    def _held_startup(self, send):
        state = self._state

        async def held(message: dict) -> None:
            if message["type"] == "lifespan.startup.complete":
                # NOTE: the engine starts in a task Sanic's after_server_start listener added; wait for it here.
                while not state.is_ready and state.fatal_error is None:
                    await asyncio.sleep(_POLL_S)
                if state.fatal_error is not None:
                    message = {"type": "lifespan.startup.failed", "message": state.fatal_error}
            await send(message)

        return held


class LLMReplica:
    """The deployment class (ray_serve.py wraps it with serve.ingress and serve.deployment). Built in the
    replica's own process, so each replica starts its own engine."""

    def __init__(self, spec: LaunchSpec):
        from ray import serve   # only ever imported inside a replica, where Ray is installed
        from launcher.server.app import build_app
        replica_id = serve.get_replica_context().replica_id.unique_id
        settings = dataclasses.replace(spec.settings, replica_id=replica_id, status_file=None,
                                       exit_on_engine_failure=False)
        # Sanic app names allow letters, digits, _ and - only.
        self._app = build_app(settings, spec.models, spec.upstreams, name="llm_" + re.sub(r"[^\w-]", "_", replica_id))
        self._state: ServerState = self._app.ctx.state

    def __serve_build_asgi_app__(self) -> ReplicaASGI:
        return ReplicaASGI(self._app, self._state)

    async def check_health(self) -> None:
        """Serve calls this every few seconds; raising makes it replace the replica (a dead engine)."""
        error = self._state.fatal_error or self._state.registry.error
        if error is not None:
            raise RuntimeError(error)
