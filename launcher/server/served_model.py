"""ServedModel: one local model behind the registry — its EngineClient, and the tokenizer, chat template and
sampling defaults the server applies around it (the engine sees token ids only); an on_demand one loads and
unloads its engine process as requests come and go."""
from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.async_client import AsyncEngineClient
from engine.engine_process import EngineProcess
from engine.model_files import ModelFiles, load_config, load_tokenizer
from engine.model_kinds import is_whisper_model, pooling_facts
from engine.messages import EngineInfo
from engine.config import EngineConfig
from engine.protocol import EngineClient, EngineStartupError
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
    def __init__(self, settings: ModelSettings,
                 new_client: Callable[[EngineConfig], EngineClient] = AsyncEngineClient,
                 process: EngineProcess | None = None):
        """process: its engine process, already started (launcher/server/__main__.py)."""
        self.settings = settings
        self._new_client = new_client
        self.client: EngineClient = new_client(settings.engine) if process is None else \
            AsyncEngineClient(settings.engine, process)
        self.metrics = ModelMetrics(settings.primary_name)
        self.created = int(time.time())
        self.tokenizer = None
        self.chat_template: str | None = None
        self.content_format = "string"
        self.defaults: dict[str, Any] = dict(_OPENAI_DEFAULTS)
        self.num_active = 0                      # requests using it now (an on_demand model stays loaded)
        self.last_used = 0.0                     # time.monotonic() of the last request's start or end
        self._loading: asyncio.Task | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        # (context window, pools, labels, takes images)
        self._config: tuple[int | None, bool, tuple[str, ...], bool] | None = None
        self.image_processor = None   # engine.vision.ImageProcessor, for a vision model
        self._speech: tuple[str, ...] | None = None   # an unloaded model's speech capabilities, from its config

    @property
    def names(self) -> tuple[str, ...]:
        return self.settings.served_model_names

    @property
    def on_demand(self) -> bool:
        return self.settings.load == "on_demand"

    @property
    def phase(self) -> str:
        if self.tokenizer is None and self.client.phase == "ready":
            return "loading tokenizer"
        return self.client.phase

    @property
    def status(self) -> str:
        """What /v1/models says: loaded, loading, unloaded (on_demand, not started) or failed."""
        if self.is_ready:
            return "loaded"
        if self.client.error is not None and not self.on_demand:
            return "failed"
        if self._loading is not None or not self.on_demand:
            return "loading"
        return "unloaded"

    @property
    def is_loaded(self) -> bool:
        """Holding (or starting) an engine process: what counts against server.max_loaded_models."""
        return self.is_ready or self._loading is not None

    @property
    def context_window(self) -> int | None:
        """max_model_len once loaded; before, what the profile or the model's config says."""
        if self.client.info is not None:
            return self.client.info.max_model_len
        return self._config_facts()[0]

    @property
    def capabilities(self) -> tuple[str, ...]:
        """What it serves: a speech model's transcription (and translation), a pooling model's endpoints
        (pooling_capabilities), or completion and (with a chat template) chat."""
        info = self.client.info
        if info is not None:
            speech = speech_capabilities(info)
        else:   # read once: /v1/models asks for every alias
            if self._speech is None:
                self._speech = speech_capabilities_of(self.settings.engine.model)
            speech = self._speech
        if speech:
            return speech
        is_pooling, labels, vision = (info.is_embedding_model, info.labels, info.is_vision_model) \
            if info is not None else self._config_facts()[1:]
        if is_pooling:
            return pooling_capabilities(labels)
        text = ("chat", "completion") if self.tokenizer is None or self.chat_template else ("completion",)
        return text + ("vision",) if vision else text

    def _config_facts(self) -> tuple[int | None, bool, tuple[str, ...], bool]:
        """An unloaded model's context window, kind and classifier labels, read once from its config (not its
        weights)."""
        if self._config is None:
            configured = self.settings.engine.max_model_len
            is_pooling, labels = pooling_facts(self.settings.engine.model)
            try:
                config = load_config(ModelFiles.at(self.settings.engine.model))
            except Exception:   # a model that cannot load (or an encoder ModelConfig lacks) says so when asked
                return (configured if isinstance(configured, int) else None), is_pooling, labels, False
            window = configured if isinstance(configured, int) else config.max_position_embeddings
            self._config = (window, is_pooling or config.is_embedding_model, labels, config.is_vision_model)
        return self._config

    @property
    def is_ready(self) -> bool:
        return self.client.is_ready and self.tokenizer is not None

    @property
    def info(self) -> EngineInfo:
        assert self.client.info is not None, "engine not ready"
        return self.client.info

    async def start(self) -> None:
        """At server start: load an at_start model (an on_demand one waits for its first request)."""
        if not self.on_demand:
            await self.load()

    async def load(self) -> None:
        """Start the engine process (once, however many requests wait for it), then the tokenizer."""
        if self.is_ready:
            return
        if self._loading is None:
            self._loading = asyncio.ensure_future(self._load())
        # NOTE: shielded: a waiting client that leaves does not cancel the load others may be waiting for
        await asyncio.shield(self._loading)

    async def _load(self) -> None:
        started = time.monotonic()
        # The tokenizer (~0.25 s for a GGUF's vocabulary) loads in a thread while the engine process imports
        # torch and loads weights, instead of after them.
        text_side = None
        if self.tokenizer is None:
            text_side = asyncio.get_running_loop().run_in_executor(None, self._read_text_side)
        try:
            try:
                await self.client.start(on_phase=lambda phase: log.info("%s: %s", self.names[0], phase))
            finally:
                read = await asyncio.gather(text_side, return_exceptions=True) if text_side is not None else None
            if read is not None:
                if isinstance(read[0], BaseException):
                    raise read[0]
                self._set_text_side(*read[0])
        except EngineStartupError as e:
            if not self.on_demand:
                raise
            failed, self.client = self.client, self._new_client(self.settings.engine)   # the next request retries
            await failed.shutdown()
            raise APIError(503, f"the model `{self.names[0]}` could not be loaded: {e}", "service_unavailable_error",
                           code="model_load_failed") from None
        finally:
            self._loading = None
        if self.on_demand:
            log.info("loaded %s in %.1fs", self.names[0], time.monotonic() - started)

    def _read_text_side(self):
        """What the server needs from the model's files alone (no engine info): tokenizer, chat template."""
        tokenizer = load_server_tokenizer(self.settings.tokenizer or self.settings.engine.model)
        template = tokenizer.chat_template
        if self.settings.chat_template:
            template = Path(self.settings.chat_template).read_text(encoding="utf-8")
        return tokenizer, template

    def _set_text_side(self, tokenizer, template: str | None) -> None:
        """Once the engine is up: the text side read beside it, and what depends on the engine's info."""
        self.chat_template = template
        fmt = self.settings.chat_template_content_format
        if fmt == "auto":
            fmt = "openai" if template and _OPENAI_PARTS_LOOP.search(template) else "string"
        self.content_format = fmt
        self.defaults = self._sampling_defaults(self.info.default_sampling)
        if self.info.is_vision_model:
            from engine.vision import load_image_processor
            path = Path(self.settings.engine.model)
            self.image_processor = load_image_processor(path, load_config(ModelFiles.at(path)))
        self.tokenizer = tokenizer

    async def unload(self) -> None:
        """End the engine process (its memory goes back to the system); the next request loads it again."""
        self.cancel_idle_unload()
        if self._loading is not None:
            return   # a request is waiting for it
        client, self.client = self.client, self._new_client(self.settings.engine)
        await client.shutdown()
        log.info("unloaded %s", self.names[0])

    def schedule_idle_unload(self) -> None:
        """An on_demand model with no request left: unload it after keep_alive_s unless one comes."""
        self.cancel_idle_unload()
        loop = asyncio.get_running_loop()
        self._idle_timer = loop.call_later(self.settings.keep_alive_s,
                                           lambda: loop.create_task(self._unload_if_idle()))

    def cancel_idle_unload(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    async def _unload_if_idle(self) -> None:
        self._idle_timer = None
        if self.num_active == 0 and self.is_ready:
            await self.unload()

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
        if self.info.is_speech_model:
            raise APIError(400, f"the model `{self.names[0]}` is a speech-to-text model: it does not generate text "
                           f"from prompts (it serves {', '.join(self.capabilities)} on /v1/audio/*)", param="model",
                           code="model_not_supported")
        if self.info.is_embedding_model:
            kind = "a classifier" if self.info.labels else "an embedding model"
            raise APIError(400, f"the model `{self.names[0]}` is {kind}: it does not generate text (it serves "
                           f"{', '.join(self.capabilities)})", param="model", code="model_not_supported")

    def check_serves(self, capability: str, endpoint: str, serving: list[str]) -> None:
        """A 400 naming what this model serves and the models here that serve `endpoint` (`serving`)."""
        if capability in self.capabilities:
            return
        others = f"models here that do: {', '.join(serving)}" if serving else "no model on this server does"
        raise APIError(400, f"the model `{self.names[0]}` does not serve {endpoint} (it serves "
                       f"{', '.join(self.capabilities)}); {others}", param="model", code="model_not_supported")

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


def pooling_capabilities(labels: tuple[str, ...]) -> tuple[str, ...]:
    """An embedding model (no labels) scores by cosine similarity; a one-label classifier is a cross-encoder."""
    if not labels:
        return ("embedding", "score", "rerank", "pooling")
    return ("classify", "score", "rerank", "pooling") if len(labels) == 1 else ("classify", "pooling")


def speech_capabilities(info: EngineInfo) -> tuple[str, ...]:
    """A loaded speech model's endpoints: transcription, and translation (to English) for multilingual ones."""
    if not info.is_speech_model:
        return ()
    return ("transcription", "translation") if info.can_translate else ("transcription",)


def speech_capabilities_of(path: str) -> tuple[str, ...]:
    """The same for a model not loaded yet (on_demand), from its files: a multilingual Whisper (vocabulary of
    51865 or more; English-only ones have 51864) also translates."""
    folder = Path(path)
    if not is_whisper_model(folder):
        return ()
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        vocab_size = config.get("vocab_size") if isinstance(config, dict) else None
        if not isinstance(vocab_size, int):   # CTranslate2's config.json has none: its vocabulary.txt, a token a line
            with open(folder / "vocabulary.txt", "rb") as f:
                vocab_size = sum(1 for _ in f)
    except (OSError, ValueError):
        vocab_size = 0
    return ("transcription", "translation") if vocab_size >= 51865 else ("transcription",)


def load_server_tokenizer(path: str):
    """The model's tokenizer, or a profile's override: a tokenizer directory (tokenizer.json) or a .gguf."""
    from engine.tokenizer import Tokenizer
    p = Path(path)
    if p.is_dir() and not (p / "config.json").exists() and (p / "tokenizer.json").exists():
        return Tokenizer.from_dir(p)
    return load_tokenizer(ModelFiles.at(p))
