"""GET /v1/models[/{id}] and /api/models (the catalogue) over local models and upstreams; POST /tokenize and
/detokenize (vLLM's shapes); GET /version."""
from __future__ import annotations

import asyncio
from importlib.metadata import PackageNotFoundError, version
from urllib.parse import unquote

from sanic import HTTPResponse
from sanic.request import Request

from launcher.catalog import CatalogEntry, select
from launcher.catalog import upstream_entry as catalog_entry
from launcher.server.chat_images import chat_images, place_images
from launcher.server.chat_prompt import render_chat_prompt
from launcher.server.errors import APIError, bad_request
from launcher.server.fields import Fields
from launcher.server.protocol_chat import parse_chat_request
from launcher.server.responses import json_response
from launcher.server.served_model import ServedModel
from launcher.server.state import ServerState
from launcher.server.upstream import Upstream, UpstreamModel, UpstreamRoute

LOCAL_PROVIDER = "llm"
_LOCAL_FEATURES = ("tools", "structured_outputs", "json_mode", "logprobs", "streaming")


def local_card(model: ServedModel, name: str) -> dict:
    return {"id": name, "object": "model", "created": model.created, "owned_by": LOCAL_PROVIDER,
            "root": model.settings.model_root, "parent": None,
            "max_model_len": model.info.max_model_len if model.client.info is not None else None,
            "provider": LOCAL_PROVIDER, "capabilities": list(model.capabilities),
            "context_window": model.context_window, "status": model.status}


def upstream_card(upstream: Upstream, model: UpstreamModel) -> dict:
    entry = upstream_entry(upstream, model)
    listed = model.listed
    return {"id": model.id, "object": "model", "created": listed.created if listed else 0,
            "owned_by": upstream.name, "root": model.upstream_id, "parent": None,
            "max_model_len": entry.context_window, "provider": upstream.name,
            "capabilities": list(entry.capabilities), "context_window": entry.context_window, "status": entry.status}


def local_entry(model: ServedModel, name: str) -> CatalogEntry:
    pricing = model.settings.pricing
    return CatalogEntry(name, LOCAL_PROVIDER, model.capabilities, model.context_window,
                        (pricing.input, pricing.output),
                        _LOCAL_FEATURES if "completion" in model.capabilities else (), model.status)


def upstream_entry(upstream: Upstream, model: UpstreamModel) -> CatalogEntry:
    listed = model.listed
    return catalog_entry(model.id, model.upstream_id, upstream.name, upstream.provider.engine,
                         listed.capabilities if listed else (), listed.context_window if listed else None)


async def _upstream_models(state: ServerState, request: Request,
                           provider: str | None) -> list[tuple[Upstream, list[UpstreamModel]]]:
    """Each upstream's models; an unreachable one is left out (or, asked for by name, its error)."""
    wanted = [u for u in state.registry.upstreams if provider in (None, u.name)]
    caller, own_keys = request.headers.get("authorization"), bool(state.settings.api_keys)
    results = await asyncio.gather(*(u.models(u.forwarded(caller, own_keys)) for u in wanted),
                                   return_exceptions=True)
    out = []
    for upstream, result in zip(wanted, results):
        if isinstance(result, APIError):
            if provider is not None:
                raise result
            continue
        if isinstance(result, BaseException):
            raise result
        out.append((upstream, result))
    return out


async def list_models(state: ServerState, request: Request) -> dict:
    registry, provider = state.registry, request.args.get("provider")
    cards = [local_card(registry.get(name), name) for name in registry.names] \
        if provider in (None, LOCAL_PROVIDER) else []
    for upstream, models in await _upstream_models(state, request, provider):
        cards += [upstream_card(upstream, m) for m in models]
    return {"object": "list", "data": cards}


async def retrieve_model(state: ServerState, request: Request, model_id: str) -> dict:
    model_id = unquote(model_id)   # clients escape the '/' in ids such as org/name
    target = await state.registry.route(model_id, request.headers.get("authorization"), bool(state.settings.api_keys))
    if isinstance(target, UpstreamRoute):
        return upstream_card(target.upstream, target.model)
    return local_card(target, model_id)


async def catalog(state: ServerState, request: Request) -> dict:
    """GET /api/models[?provider=&capability=]: {"models": [{id, provider, capabilities, context_window,
    pricing, features, status}]}."""
    registry, provider = state.registry, request.args.get("provider")
    entries = [local_entry(registry.get(name), name) for name in registry.names] \
        if provider in (None, LOCAL_PROVIDER) else []
    for upstream, models in await _upstream_models(state, request, provider):
        entries += [upstream_entry(upstream, m) for m in models]
    return {"models": [e.to_json() for e in select(entries, capability=request.args.get("capability"))]}


async def tokenize(state: ServerState, model: ServedModel, request: Request, body: dict) -> HTTPResponse:
    """{"prompt": str} or {"messages": [...]} -> {"count", "max_model_len", "tokens", "token_strs"}."""
    f = Fields(body)
    f.str("model")
    return_strs = bool(f.bool("return_token_strs", False))
    if f.has("messages"):
        req = parse_chat_request({**body, "model": body.get("model") or ""}, model.info.vocab_size)
        ids, _ = place_images(model, render_chat_prompt(model, req), await chat_images(state, model, req.messages))
    else:
        prompt = f.str("prompt")
        if prompt is None:
            raise bad_request("'prompt' (a string) or 'messages' is required", "prompt")
        ids = model.tokenizer.encode(prompt, add_special_tokens=bool(f.bool("add_special_tokens", True)))
    strs = model.tokenizer.convert_ids_to_tokens(ids) if return_strs else None
    return json_response({"count": len(ids), "max_model_len": model.info.max_model_len, "tokens": ids,
                          "token_strs": strs})


async def detokenize(state: ServerState, model: ServedModel, request: Request, body: dict) -> HTTPResponse:
    """{"tokens": [ids]} -> {"prompt": text}."""
    f = Fields(body)
    f.str("model")
    if f.raw("tokens") is None:
        raise bad_request("'tokens' (an array of token ids) is required", "tokens")
    ids = f.int_list("tokens", 0, model.info.vocab_size - 1)
    return json_response({"prompt": model.tokenizer.decode(ids, skip_special_tokens=False)})


def version_info() -> dict:
    try:
        return {"version": version("llm-serve")}
    except PackageNotFoundError:
        return {"version": "0+unknown"}
