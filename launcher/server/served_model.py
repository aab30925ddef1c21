"""ServedModel: one local model behind the registry — its EngineClient, and the tokenizer, chat template and
sampling defaults the server applies around it (the engine sees token ids only)."""
from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any

from engine.async_client import AsyncEngineClient
from engine.loader import ModelFiles, load_tokenizer
from engine.messages import EngineInfo
from engine.protocol import EngineClient
from engine.validation import InvalidRequest, check_context_length
from launcher.server.errors import APIError, not_ready
from launcher.server.metrics import ModelMetrics
from launcher.server.protocol import DEFAULTABLE
from launcher.server.settings import ModelSettings

log = logging.getLogger("llm.server")

# OpenAI's defaults for what neither the request, the profile nor the model sets.
_OPENAI_DEFAULTS = {"temperature": 1.0, "top_p": 1.0}
_OPENAI_PARTS_LOOP = re.compile(r"for\s+\w+\s+in\s+\w+(\[\s*['\"]content['\"]\s*\]|\.content)")


class ServedModel:
    def __init__(self, settings: ModelSettings, client: EngineClient | None = None):
        self.settings = settings
        self.client: EngineClient = client if client is not None else AsyncEngineClient(settings.engine)
        self.metrics = ModelMetrics(settings.primary_name)
        self.created = int(time.time())
        self.tokenizer = None
        self.chat_template: str | None = None
        self.content_format = "string"
        self.defaults: dict[str, Any] = dict(_OPENAI_DEFAULTS)

    @property
    def names(self) -> tuple[str, ...]:
        return self.settings.served_model_names

    @property
    def phase(self) -> str:
        if self.tokenizer is None and self.client.phase == "ready":
            return "loading tokenizer"
        return self.client.phase

    @property
    def is_ready(self) -> bool:
        return self.client.is_ready and self.tokenizer is not None

    @property
    def info(self) -> EngineInfo:
        assert self.client.info is not None, "engine not ready"
        return self.client.info

    async def start(self) -> None:
        """Start the engine, then load the tokenizer and chat template (the engine owns the weights)."""
        await self.client.start(on_phase=lambda phase: log.info("startup: %s", phase))
        tokenizer = load_server_tokenizer(self.settings.tokenizer or self.settings.engine.model)
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

    def check_ready(self) -> None:
        if not self.is_ready:
            raise not_ready(self.phase)

    def check_generates(self) -> None:
        if self.info.is_embedding_model:
            raise APIError(400, f"the model `{self.names[0]}` is an embedding model: use /v1/embeddings",
                           param="model", code="model_not_supported")

    def resolve_max_tokens(self, num_prompt_tokens: int, requested: int | None, param: str = "prompt") -> int:
        """max_tokens for one prompt (default: the rest of the context); a prompt that cannot fit is a 400
        naming both numbers, never truncated."""
        limit = self.info.max_model_len
        max_tokens = requested if requested is not None else self.defaults.get("max_tokens")
        try:
            check_context_length(num_prompt_tokens, max_tokens, limit, param)
        except InvalidRequest as e:
            raise APIError(400, str(e), param=e.param, code=e.code) from None
        return max_tokens if max_tokens is not None else limit - num_prompt_tokens


def load_server_tokenizer(path: str):
    """The model's tokenizer, or a profile's override: a tokenizer directory (tokenizer.json) or a .gguf."""
    from engine.tokenizer import Tokenizer
    p = Path(path)
    if p.is_dir() and not (p / "config.json").exists() and (p / "tokenizer.json").exists():
        return Tokenizer.from_dir(p)
    return load_tokenizer(ModelFiles.at(p))
