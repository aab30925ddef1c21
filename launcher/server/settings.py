"""What the server process is handed (a frozen, picklable seam): ServerSettings, and ModelSettings per model."""
from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.config import EngineConfig
from launcher.profile_keys import Pricing


@dataclass(frozen=True, slots=True)
class MediaSettings:
    """Where a prompt's image URLs may point, and how big what they name may be (launcher/server/images.py)."""
    allowed_dirs: tuple[str, ...] = ()          # file:// URLs only under these (resolved) folders; empty: none
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 32 * 1024 * 1024
    fetch_timeout_s: float = 10.0
    offline: bool = False                       # http(s) image URLs refused (LLM_OFFLINE, --offline)


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """The HTTP side, shared by every model."""
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()              # empty: no auth
    cors_origins: tuple[str, ...] = ()          # empty: CORS off; '*' allows any origin
    max_request_body_bytes: int = 16 * 1024 * 1024
    max_queued_requests: int = 1024             # in-flight requests beyond this get 503
    request_timeout_s: float = 600.0
    log_level: str = "info"
    log_requests: bool = False
    status_file: str | None = None              # where a fatal error is written for the supervisor
    max_loaded_models: int | None = None        # on_demand models: at most this many loaded at once
    max_stored_responses: int = 1000            # /v1/responses with store: the least recently used go past this
    persist_responses: bool = False             # stored responses also as JSON files in $LLM_HOME/responses
    max_audio_s: float = 600.0                  # longest clip the audio endpoints decode (and a realtime commit)
    media: MediaSettings = field(default_factory=lambda: MediaSettings())   # image URLs in prompts
    replica_id: str = ""                        # a Ray Serve replica's id: /metrics and an X-LLM-Replica header say it
    # False under Ray Serve: a dead engine fails the replica's health check (Serve replaces the replica); stopping
    # the server there would stop the event loop Serve itself runs on.
    exit_on_engine_failure: bool = True


@dataclass(frozen=True, slots=True)
class ModelSettings:
    """One local model: its engine, the names it is served under, and what the server adds around it."""
    engine: EngineConfig
    served_model_names: tuple[str, ...]         # first = primary; every name is an alias of the same model
    model_root: str = ""                        # the real checkpoint (path or repo id), shown as `root`
    chat_template: str | None = None            # a Jinja file overriding the model's template
    tokenizer: str | None = None                # a tokenizer directory or .gguf overriding the model's
    chat_template_content_format: str = "auto"  # auto | string | openai
    default_sampling: dict[str, Any] = field(default_factory=dict)   # profile [defaults] overrides
    use_generation_config: bool = True          # take the model's generation_config.json defaults
    load: str = "at_start"                      # at_start | on_demand
    keep_alive_s: float = 300.0                 # on_demand: unloaded after this long idle
    pricing: Pricing = field(default_factory=Pricing)   # per 1M tokens, shown by /api/models

    @property
    def primary_name(self) -> str:
        return self.served_model_names[0] if self.served_model_names else self.model_root


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    """A server (or provider API) whose models are served through this one; see launcher/providers.py."""
    name: str                                   # shown as owned_by / provider
    engine: str                                 # a launcher.providers engine name
    base_url: str | None                        # None: nothing to reach (an unknown engine with no URL)
    api_key_env: str | None = None              # env var holding the key sent upstream (read by the server)
    models: tuple[str, ...] = ("*",)            # upstream ids, or ("*",): whatever it lists
    prefix: str = ""                            # prepended to upstream ids
    timeout_s: float = 60.0
    refresh_s: float = 300.0                    # how long a "*" listing is cached
    forward_authorization: bool = True
    api_version: str | None = None              # azure's api-version


@dataclass(frozen=True, slots=True)
class LaunchSpec:
    """Everything the server process needs: handed over as a pickle file by the supervisor."""
    settings: ServerSettings
    models: tuple[ModelSettings, ...]
    upstreams: tuple[UpstreamSettings, ...] = ()


def write_launch_spec(spec: LaunchSpec, path: str | Path) -> None:
    Path(path).write_bytes(pickle.dumps(spec))


def read_launch_spec(path: str | Path) -> LaunchSpec:
    spec = pickle.loads(Path(path).read_bytes())
    assert isinstance(spec, LaunchSpec), type(spec)
    return spec
