"""ServerState: the engine client, tokenizer, settings and counters the handlers share."""
from __future__ import annotations

import contextlib
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from engine.async_client import AsyncEngineClient
from engine.config import EngineConfig
from engine.loader import ModelFiles, load_tokenizer
from engine.messages import EngineInfo, TokenOutput
from engine.sampling_params import SamplingParams
from launcher.server.errors import APIError, model_not_found, not_ready
from launcher.server.metrics import ServerMetrics
from launcher.server.protocol import DEFAULTABLE
from launcher.server.settings import ServerSettings

log = logging.getLogger("llm.server")

# OpenAI's defaults for what neither the request, the profile nor the model sets.
_OPENAI_DEFAULTS = {"temperature": 1.0, "top_p": 1.0}
_OPENAI_PARTS_LOOP = re.compile(r"for\s+\w+\s+in\s+\w+(\[\s*['\"]content['\"]\s*\]|\.content)")


class ServerState:
    def __init__(self, settings: ServerSettings, engine_config: EngineConfig):
        self.settings = settings
        self.engine_config = engine_config
        self.engine = AsyncEngineClient(engine_config)
        self.metrics = ServerMetrics(settings.primary_name)
        self.created = int(time.time())
        self.started_at = time.monotonic()
        self.ready_seconds: float | None = None
        self.tokenizer = None
        self.chat_template: str | None = None
        self.content_format = "string"
        self.defaults: dict[str, Any] = dict(_OPENAI_DEFAULTS)
        self.num_in_flight = 0
        self.shutting_down = False
        self.exit_code = 0

    # -- startup --------------------------------------------------------------------------------

    @property
    def phase(self) -> str:
        if self.tokenizer is None and self.engine.phase == "ready":
            return "loading tokenizer"
        return self.engine.phase

    @property
    def is_ready(self) -> bool:
        return self.engine.is_ready and self.tokenizer is not None and not self.shutting_down

    @property
    def info(self) -> EngineInfo:
        assert self.engine.info is not None, "engine not ready"
        return self.engine.info

    async def start(self) -> None:
        """Start the engine, then load the tokenizer and chat template (the engine owns the weights)."""
        await self.engine.start(on_phase=lambda phase: log.info("startup: %s", phase))
        tokenizer = load_server_tokenizer(self.settings.tokenizer or self.engine_config.model)
        template = tokenizer.chat_template
        if self.settings.chat_template:
            template = Path(self.settings.chat_template).read_text(encoding="utf-8")
        self.chat_template = template
        fmt = self.settings.chat_template_content_format
        if fmt == "auto":
            fmt = "openai" if template and _OPENAI_PARTS_LOOP.search(template) else "string"
        self.content_format = fmt
        self.defaults = self._sampling_defaults(self.info.default_sampling)
        self.tokenizer = tokenizer
        self.ready_seconds = time.monotonic() - self.started_at

    def _sampling_defaults(self, model_defaults: dict[str, Any]) -> dict[str, Any]:
        """Request > profile [defaults] > the model's generation_config.json > OpenAI's defaults."""
        from_model = {k: v for k, v in model_defaults.items() if k in DEFAULTABLE} \
            if self.settings.use_generation_config else {}
        from_profile = {k: v for k, v in self.settings.default_sampling.items() if k in DEFAULTABLE}
        changed = {k: v for k, v in from_model.items() if k not in from_profile and _OPENAI_DEFAULTS.get(k) != v}
        if changed:
            log.warning("the model's generation_config.json changes the sampling defaults for requests that omit "
                        "them: %s (set [defaults] in the profile, or use_generation_config = false, to change "
                        "this)", ", ".join(f"{k}={v}" for k, v in sorted(changed.items())))
        return {**_OPENAI_DEFAULTS, **from_model, **from_profile}

    # -- per request ----------------------------------------------------------------------------

    def check_ready(self) -> None:
        if self.shutting_down:
            raise APIError(503, "the server is shutting down", "service_unavailable_error", code="shutting_down")
        if not self.is_ready:
            raise not_ready(self.phase)

    def check_model(self, name: str) -> None:
        if name not in self.settings.served_model_names:
            raise model_not_found(name)

    def check_generates(self, name: str) -> None:
        if self.info.is_embedding_model:
            raise APIError(400, f"the model `{name}` is an embedding model: use /v1/embeddings", param="model",
                           code="model_not_supported")

    def new_request_id(self, prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex}"

    @contextlib.contextmanager
    def admitted(self) -> Iterator[None]:
        """Count a generation request in flight; refuse it when the queue is full."""
        if self.num_in_flight >= self.settings.max_queued_requests:
            raise APIError(503, f"the server is at capacity ({self.num_in_flight} requests in flight); retry "
                           "later", "service_unavailable_error", code="queue_full", headers={"Retry-After": "1"})
        self.num_in_flight += 1
        try:
            yield
        finally:
            self.num_in_flight -= 1

    def resolve_max_tokens(self, num_prompt_tokens: int, requested: int | None, param: str = "prompt") -> int:
        """max_tokens for one prompt; a prompt that cannot fit is a 400 naming both numbers, never truncated."""
        limit = self.info.max_model_len
        max_tokens = requested if requested is not None else self.defaults.get("max_tokens")
        if max_tokens is None:
            if num_prompt_tokens >= limit:
                raise _too_long(limit, num_prompt_tokens, None, param)
            return limit - num_prompt_tokens
        if num_prompt_tokens + max_tokens > limit:
            raise _too_long(limit, num_prompt_tokens, max_tokens, param)
        return max_tokens

    def generate(self, request_id: str, prompt_token_ids: list[int],
                 params: SamplingParams) -> AsyncIterator[TokenOutput]:
        return self.engine.generate(request_id, prompt_token_ids, params)


def load_server_tokenizer(path: str):
    """The model's tokenizer, or a profile's override: a tokenizer directory (tokenizer.json) or a .gguf."""
    from engine.tokenizer import Tokenizer
    p = Path(path)
    if p.is_dir() and not (p / "config.json").exists() and (p / "tokenizer.json").exists():
        return Tokenizer.from_dir(p)
    return load_tokenizer(ModelFiles.at(p))


def _too_long(limit: int, num_prompt: int, max_tokens: int | None, param: str) -> APIError:
    asked = "" if max_tokens is None else f" and {max_tokens} requested for the completion ({num_prompt + max_tokens}" \
                                          " in total)"
    return APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                    f"{num_prompt} tokens in the prompt{asked}. Please reduce the length of the prompt or "
                    "max_tokens.", param=param, code="context_length_exceeded")
