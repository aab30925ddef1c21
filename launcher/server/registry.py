"""ModelRegistry: every served name -> what serves it (a local model or an upstream); the one way handlers
reach a model. It also keeps on_demand models within server.max_loaded_models (least recently used out)."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from launcher.server.errors import APIError, model_not_found
from launcher.server.served_model import ServedModel
from launcher.server.upstream import Upstream, UpstreamRoute

log = logging.getLogger("llm.server")


class ModelRegistry:
    def __init__(self, models: list[ServedModel], upstreams: list[Upstream] = (),
                 max_loaded_models: int | None = None):
        self.models = list(models)
        self.upstreams = list(upstreams)
        self.max_loaded_models = max_loaded_models
        self._by_name: dict[str, ServedModel] = {}
        for model in self.models:
            for name in model.names:
                other = self._by_name.setdefault(name, model)
                assert other is model, f"two models claim the served name {name!r}"
        self._room = asyncio.Lock()   # one load at a time decides who is unloaded

    @property
    def names(self) -> list[str]:
        """Every local served name and alias, in the order the models were given."""
        return list(self._by_name)

    def local(self, name: object) -> ServedModel | None:
        return self._by_name.get(name) if isinstance(name, str) else None

    def get(self, name: object) -> ServedModel:
        """The local model a request names; 404 model_not_found for anything else."""
        model = self.local(name)
        if model is None:
            raise model_not_found(name)
        return model

    async def route(self, name: object, authorization: str | None = None,
                    server_has_keys: bool = False) -> ServedModel | UpstreamRoute:
        """What serves `name`: a local model, else the first upstream that serves it; else 404.
        `authorization` is the caller's header (an upstream lists with it when it may be forwarded)."""
        model = self.local(name)
        if model is not None:
            return model
        if isinstance(name, str):
            for upstream in self.upstreams:
                found = await upstream.find(name, upstream.forwarded(authorization, server_has_keys))
                if found is not None:
                    return UpstreamRoute(upstream, found)
        raise model_not_found(name)

    @property
    def primary(self) -> ServedModel | None:
        return self.models[0] if self.models else None

    @property
    def at_start(self) -> list[ServedModel]:
        return [m for m in self.models if not m.on_demand]

    @property
    def is_ready(self) -> bool:
        """Every at_start model can serve (on_demand ones load when asked)."""
        return all(m.is_ready for m in self.at_start)

    @property
    def phase(self) -> str:
        """The first at_start model's phase that is not 'ready' (the one startup waits on), else 'ready'."""
        return next((m.phase for m in self.at_start if not m.is_ready), "ready")

    @property
    def error(self) -> str | None:
        """Why an at_start model's engine failed (fatal for the server); on_demand ones fail per request."""
        return next((m.client.error for m in self.at_start if m.client.error is not None), None)

    async def start(self) -> None:
        await asyncio.gather(*(m.start() for m in self.models))

    async def shutdown(self) -> None:
        for model in self.models:
            model.cancel_idle_unload()
        await asyncio.gather(*(m.client.shutdown() for m in self.models), *(u.close() for u in self.upstreams))

    @contextlib.asynccontextmanager
    async def using(self, model: ServedModel) -> AsyncIterator[ServedModel]:
        """Hold a model for one request: an on_demand one is loaded first (the request waits), and stays
        loaded until keep_alive_s after its last request ends."""
        model.num_active += 1
        model.last_used = time.monotonic()
        model.cancel_idle_unload()
        try:
            if model.on_demand and not model.is_ready:
                await self._make_room_for(model)
                await model.load()
            model.check_ready()
            yield model
        finally:
            model.num_active -= 1
            model.last_used = time.monotonic()
            if model.on_demand and model.num_active == 0 and model.is_ready:
                model.schedule_idle_unload()

    async def _make_room_for(self, model: ServedModel) -> None:
        """Unload least recently used idle on_demand models until loading `model` stays within the limit."""
        if self.max_loaded_models is None:
            return
        async with self._room:
            while sum(m.is_loaded for m in self.models if m is not model) >= self.max_loaded_models:
                idle = [m for m in self.models
                        if m is not model and m.on_demand and m.is_ready and m.num_active == 0]
                if not idle:
                    raise APIError(503, f"{self.max_loaded_models} models are loaded (server.max_loaded_models) "
                                   f"and none is idle to make room for `{model.names[0]}`; retry later",
                                   "service_unavailable_error", code="max_loaded_models",
                                   headers={"Retry-After": "1"})
                victim = min(idle, key=lambda m: m.last_used)
                log.info("unloading %s (least recently used) to load %s", victim.names[0], model.names[0])
                await victim.unload()
