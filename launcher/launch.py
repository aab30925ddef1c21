"""A profile and the environment -> the LaunchSpec the server process runs (local models resolved to
paths, upstreams from [[upstreams]] and the gateway document's MAIN_MODEL_* variables)."""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

from engine.config import EngineConfig
from engine.weights import is_offline
from launcher.profile import ModelEntry, Profile, UpstreamSection, engine_kwargs
from launcher.providers import ALIASES, AZURE_DEFAULT_API_VERSION, PROVIDERS, provider
from launcher.server.settings import LaunchSpec, MediaSettings, ModelSettings, ServerSettings, UpstreamSettings

Resolver = Callable[..., Path]   # engine.weights.resolve_model's shape


def build_launch(profile: Profile, resolve: Resolver, environ: Mapping[str, str] = os.environ) -> LaunchSpec:
    """Resolve every enabled local model (fetching it if allowed) and collect the upstreams."""
    s = profile.server
    settings = ServerSettings(
        host=s.host, port=s.port, api_keys=tuple(s.resolve_api_keys(dict(environ))),
        cors_origins=tuple(s.cors_origins), max_request_body_bytes=s.max_request_body_bytes,
        max_queued_requests=s.max_queued_requests, request_timeout_s=s.request_timeout_s,
        log_requests=s.log_requests, max_loaded_models=s.max_loaded_models,
        max_stored_responses=s.max_stored_responses, persist_responses=s.persist_responses,
        max_audio_s=s.max_audio_s, media=MediaSettings(
            allowed_dirs=tuple(s.allowed_media_dirs), max_bytes=s.max_image_bytes, max_pixels=s.max_image_pixels,
            fetch_timeout_s=s.media_fetch_timeout_s,
            offline=is_offline(any(e.model.offline for e in profile.local_models))))
    models = tuple(_model_settings(profile, entry, resolve) for entry in profile.local_models)
    upstreams = [upstream_settings(u, environ) for u in profile.upstreams]
    gateway = gateway_upstream(environ)
    if gateway is not None:
        upstreams.append(gateway)
    return LaunchSpec(settings, models, tuple(upstreams))


def _model_settings(profile: Profile, entry: ModelEntry, resolve: Resolver) -> ModelSettings:
    m, d = entry.model, profile.defaults
    path = resolve(m.source, revision=m.revision, offline=m.offline)
    tokenizer = resolve(m.tokenizer, offline=m.offline) if m.tokenizer else None
    return ModelSettings(
        engine=EngineConfig(model=str(path), **engine_kwargs(profile, entry)), served_model_names=tuple(m.names),
        model_root=m.source, chat_template=m.chat_template, tokenizer=str(tokenizer) if tokenizer else None,
        default_sampling=d.sampling_overrides(), use_generation_config=d.use_generation_config, load=m.load,
        keep_alive_s=m.keep_alive_s, **({"pricing": m.pricing} if m.pricing is not None else {}))


def upstream_settings(u: UpstreamSection, environ: Mapping[str, str] = os.environ) -> UpstreamSettings:
    info = provider(u.engine)
    base_url = u.base_url or info.default_base_url
    if info.engine == "azure" and base_url is None:
        base_url = (environ.get("AZURE_OPENAI_ENDPOINT") or "").rstrip("/") or None
    return UpstreamSettings(
        name=u.name, engine=info.engine, base_url=base_url, api_key_env=u.api_key_env or info.key_env,
        models=u.models, prefix=u.prefix, timeout_s=u.timeout_s, refresh_s=u.refresh_s,
        forward_authorization=u.forward_authorization,
        api_version=u.api_version or (AZURE_DEFAULT_API_VERSION if info.engine == "azure" else None))


def gateway_upstream(environ: Mapping[str, str] = os.environ) -> UpstreamSettings | None:
    """The gateway document's environment mode: MAIN_MODEL_ENGINE (+ MAIN_MODEL_BASE_URL and the provider's
    key variables) adds one upstream serving everything it lists. An engine the table does not know, with
    no base URL, contributes an empty list rather than an error."""
    engine = environ.get("MAIN_MODEL_ENGINE", "").strip()
    if not engine:
        return None
    known = engine in PROVIDERS or engine in ALIASES
    info = provider(engine)
    base_url = environ.get("MAIN_MODEL_BASE_URL") or None
    if info.engine == "azure":
        base_url = base_url or environ.get("AZURE_OPENAI_ENDPOINT") or None
    elif info.engine == "cohere":
        base_url = base_url or environ.get("COHERE_BASE_URL") or info.default_base_url
    elif known:
        base_url = base_url or info.default_base_url
    return UpstreamSettings(
        name=engine, engine=info.engine, base_url=base_url.rstrip("/") if base_url else None,
        api_key_env=info.key_env, models=("*",),
        api_version=(environ.get("AZURE_OPENAI_API_VERSION") or AZURE_DEFAULT_API_VERSION)
        if info.engine == "azure" else None)


def startup_lines(spec: LaunchSpec, environ: Mapping[str, str] = os.environ) -> list[str]:
    """What the supervisor prints about the upstreams before the server starts."""
    lines = []
    for u in spec.upstreams:
        models = "every model it lists" if u.models == ("*",) else ", ".join(u.prefix + m for m in u.models)
        where = u.base_url or "(no base URL: it serves no models)"
        key = "no key" if u.api_key_env is None else \
            f"key from ${u.api_key_env} ({'set' if environ.get(u.api_key_env) else 'unset'})"
        lines.append(f"llm: upstream {u.name!r} ({u.engine}) at {where}: {models}; {key}")
    return lines
