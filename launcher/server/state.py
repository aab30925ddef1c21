"""ServerState: the settings, the model registry and the counters every handler shares."""
from __future__ import annotations

import contextlib
import time
import uuid
from collections import Counter
from collections.abc import Iterator

from kernels.user_dir import llm_home
from launcher.server.errors import APIError, not_ready
from launcher.server.registry import ModelRegistry
from launcher.server.response_store import ResponseStore
from launcher.server.served_model import ServedModel
from engine.engine_process import EngineProcess
from launcher.server.settings import ModelSettings, ServerSettings, UpstreamSettings
from launcher.server.upstream import Upstream


class ServerState:
    def __init__(self, settings: ServerSettings, models: tuple[ModelSettings, ...],
                 upstreams: tuple[UpstreamSettings, ...] = (), started: dict[int, EngineProcess] | None = None):
        """started: engine processes already started, by model index."""
        self.settings = settings
        started = started or {}
        self.registry = ModelRegistry([ServedModel(m, process=started.get(i)) for i, m in enumerate(models)],
                                      [Upstream(u) for u in upstreams], settings.max_loaded_models)
        self.responses = ResponseStore(settings.max_stored_responses,
                                       llm_home() / "responses" if settings.persist_responses else None)
        self.http_requests: Counter[tuple[str, int]] = Counter()   # (route, status) -> count
        self.started_at = time.monotonic()
        self.ready_seconds: float | None = None
        self.num_in_flight = 0
        self.shutting_down = False
        self.exit_code = 0
        self.fatal_error: str | None = None    # why the server gave up (the engine failed to start, or died)

    @property
    def phase(self) -> str:
        return self.registry.phase

    @property
    def is_ready(self) -> bool:
        return self.registry.is_ready and not self.shutting_down

    async def start(self) -> None:
        await self.registry.start()
        self.ready_seconds = time.monotonic() - self.started_at

    def check_ready(self) -> None:
        if self.shutting_down:
            raise APIError(503, "the server is shutting down", "service_unavailable_error", code="shutting_down")
        if not self.is_ready:
            raise not_ready(self.phase)

    def new_request_id(self, prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex}"

    @contextlib.contextmanager
    def admitted(self) -> Iterator[None]:
        """Count a request in flight; refuse it when the queue is full."""
        if self.num_in_flight >= self.settings.max_queued_requests:
            raise APIError(503, f"the server is at capacity ({self.num_in_flight} requests in flight); retry "
                           "later", "service_unavailable_error", code="queue_full", headers={"Retry-After": "1"})
        self.num_in_flight += 1
        try:
            yield
        finally:
            self.num_in_flight -= 1
