"""The Sanic app: routes only (logic lives in serving_*, parsing in protocol*, plumbing in middleware/lifecycle)."""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from sanic import HTTPResponse, Sanic
from sanic.request import Request
from sanic.response import html

from launcher.server import lifecycle, middleware
from launcher.server.errors import APIError, OpenAIErrorHandler
from launcher.server.fields import parse_json_body
from launcher.server.metrics import render as render_metrics
from launcher.server.openapi import DOCS_HTML, openapi_spec
from launcher.server.responses import json_response
from launcher.server.serving_chat import create_chat_completion
from launcher.server.serving_completions import create_completion
from launcher.server.serving_embeddings import create_embedding
from launcher.server.serving_pooling import (create_classify, create_pooling, create_rerank, create_rerank_v2,
                                             create_score)
from launcher.server.serving_responses import (cancel_response, create_response, delete_response, list_input_items,
                                               retrieve_response)
from launcher.server.protocol import requested_model
from launcher.server.realtime import serve_realtime
from launcher.server.serving_audio import create_transcription
from launcher.server.serving_models import catalog, detokenize, list_models, retrieve_model, tokenize, version_info
from launcher.server.settings import ModelSettings, ServerSettings, UpstreamSettings
from launcher.server.state import ServerState
from launcher.server.upstream import UpstreamRoute

if TYPE_CHECKING:
    from engine.engine_process import EngineProcess


def build_app(settings: ServerSettings, models: tuple[ModelSettings, ...],
              upstreams: tuple[UpstreamSettings, ...] = (), name: str = "llm",
              started: dict[int, EngineProcess] | None = None) -> Sanic:
    """started: engine processes already started, by model index (the rest start with the server)."""
    app = Sanic(name, error_handler=OpenAIErrorHandler(), configure_logging=False)
    app.config.REQUEST_MAX_SIZE = settings.max_request_body_bytes
    app.config.WEBSOCKET_MAX_SIZE = settings.max_request_body_bytes   # one realtime event is one request's worth
    app.config.RESPONSE_TIMEOUT = settings.request_timeout_s + 30   # our own limits end requests first
    app.config.REQUEST_TIMEOUT = 60
    app.config.GRACEFUL_SHUTDOWN_TIMEOUT = 5.0
    app.config.NOISY_EXCEPTIONS = False
    app.config.TOUCHUP = False
    app.config.AUTO_EXTEND = False
    app.ctx.state = ServerState(settings, models, upstreams, started)
    middleware.install(app)
    lifecycle.install(app)
    _routes(app)
    return app


def _state(request: Request) -> ServerState:
    return request.app.ctx.state


def _ready_state(request: Request) -> ServerState:
    state = _state(request)
    state.check_ready()
    return state


async def _serve(request: Request, endpoint: str, handler, model_optional: bool = False) -> HTTPResponse | None:
    """A request for a model: parsed, routed by its `model` through the registry — proxied to an upstream, or
    handed to `handler(state, model, request, body)` with a local model held (and loaded, if on demand)."""
    body = parse_json_body(request.body)
    state = _ready_state(request)
    registry = state.registry
    if model_optional and body.get("model") is None:   # vLLM's /tokenize: the (first) local model
        if registry.primary is None:
            raise APIError(400, "'model' is required: this server serves no local model", param="model")
        target = registry.primary
    else:
        target = await registry.route(requested_model(body), request.headers.get("authorization"),
                                      bool(state.settings.api_keys))
    if isinstance(target, UpstreamRoute):
        with state.admitted():
            return await target.proxy(request, endpoint, body, bool(state.settings.api_keys))
    async with registry.using(target) as model:
        return await handler(state, model, request, body)


def _routes(app: Sanic) -> None:
    @app.get("/health")
    async def health(request: Request) -> HTTPResponse:
        return json_response({"status": "alive", "phase": _state(request).phase})

    @app.get("/health/ready")
    async def ready(request: Request) -> HTTPResponse:
        state = _state(request)
        if not state.is_ready:
            body = APIError(503, f"not ready: {state.phase}", "service_unavailable_error",
                            code="model_not_ready").body()
            return json_response({**body, "status": "starting", "phase": state.phase}, 503, {"Retry-After": "1"})
        answer = {"status": "ready", "phase": "ready", "models": state.registry.names,
                  "upstreams": [u.name for u in state.registry.upstreams],
                  "startup_seconds": round(state.ready_seconds or 0.0, 2)}
        first = next((m for m in state.registry.models if m.is_ready), None)
        if first is not None:   # the ready line shows the first loaded model's figures
            info = first.info
            answer.update(device=info.device, dtype=info.dtype, max_model_len=info.max_model_len,
                          kv_capacity_tokens=info.kv_capacity_tokens)
        return json_response(answer)

    @app.get("/v1/models")
    async def models(request: Request) -> HTTPResponse:
        return json_response(await list_models(_state(request), request))

    @app.get("/v1/models/<model_id:path>")
    async def model(request: Request, model_id: str) -> HTTPResponse:
        return json_response(await retrieve_model(_state(request), request, model_id))

    @app.get("/api/models")
    async def catalogue(request: Request) -> HTTPResponse:
        return json_response(await catalog(_state(request), request))

    @app.post("/v1/completions")
    async def completions(request: Request) -> HTTPResponse | None:
        return await _serve(request, "completions", create_completion)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> HTTPResponse | None:
        return await _serve(request, "chat/completions", create_chat_completion)

    @app.post("/v1/responses")
    async def responses_create(request: Request) -> HTTPResponse | None:
        return await _serve(request, "responses", create_response)

    @app.get("/v1/responses/<response_id>")
    async def responses_get(request: Request, response_id: str) -> HTTPResponse:
        return await retrieve_response(_state(request), response_id)

    @app.delete("/v1/responses/<response_id>")
    async def responses_delete(request: Request, response_id: str) -> HTTPResponse:
        return await delete_response(_state(request), response_id)

    @app.post("/v1/responses/<response_id>/cancel")
    async def responses_cancel(request: Request, response_id: str) -> HTTPResponse:
        return await cancel_response(_state(request), response_id)

    @app.get("/v1/responses/<response_id>/input_items")
    async def responses_input_items(request: Request, response_id: str) -> HTTPResponse:
        return await list_input_items(_state(request), request, response_id)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> HTTPResponse:
        return await _serve(request, "embeddings", create_embedding)

    @app.post("/pooling")
    async def pooling(request: Request) -> HTTPResponse | None:
        return await _serve(request, "pooling", create_pooling)

    @app.post("/classify")
    async def classify(request: Request) -> HTTPResponse | None:
        return await _serve(request, "classify", create_classify)

    async def score(request: Request) -> HTTPResponse | None:
        return await _serve(request, "score", create_score)

    async def rerank(request: Request) -> HTTPResponse | None:
        return await _serve(request, "rerank", create_rerank)

    for uri, handler in (("/score", score), ("/v1/score", score), ("/rerank", rerank), ("/v1/rerank", rerank)):
        app.add_route(handler, uri, methods=["POST"], name=uri.strip("/").replace("/", "_"))

    @app.post("/v2/rerank")
    async def rerank_v2(request: Request) -> HTTPResponse | None:
        return await _serve(request, "v2/rerank", create_rerank_v2)

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request) -> HTTPResponse | None:
        return await create_transcription(_ready_state(request), request, "transcribe")

    @app.post("/v1/audio/translations")
    async def translations(request: Request) -> HTTPResponse | None:
        return await create_transcription(_ready_state(request), request, "translate")

    @app.websocket("/v1/realtime")
    async def realtime(request: Request, ws) -> None:
        await serve_realtime(_state(request), request, ws)

    @app.post("/tokenize")
    async def tokenize_route(request: Request) -> HTTPResponse:
        return await _serve(request, "tokenize", tokenize, model_optional=True)

    @app.post("/detokenize")
    async def detokenize_route(request: Request) -> HTTPResponse:
        return await _serve(request, "detokenize", detokenize, model_optional=True)

    @app.get("/version")
    async def version(request: Request) -> HTTPResponse:
        return json_response(version_info())

    @app.get("/metrics")
    async def metrics(request: Request) -> HTTPResponse:
        state = _state(request)
        models = state.registry.models
        stats = await asyncio.gather(*(m.client.stats() for m in models))
        text = render_metrics([(m.metrics, s) for m, s in zip(models, stats)], state.num_in_flight,
                              state.http_requests, state.settings.replica_id)
        return HTTPResponse(text, content_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/openapi.json")
    async def openapi(request: Request) -> HTTPResponse:
        return json_response(openapi_spec(version=version_info()["version"]))

    @app.get("/docs")
    async def docs(request: Request) -> HTTPResponse:
        return html(DOCS_HTML)

    # CORS preflights: the request middleware answers OPTIONS before any handler runs.
    for uri in ("/v1/models", "/v1/models/<model_id:path>", "/api/models", "/v1/completions", "/v1/chat/completions",
                "/v1/embeddings", "/v1/responses", "/v1/responses/<response_id>", "/v1/responses/<response_id>/cancel",
                "/v1/responses/<response_id>/input_items", "/tokenize", "/detokenize",
                "/pooling", "/classify", "/score", "/v1/score", "/rerank", "/v1/rerank", "/v2/rerank",
                "/v1/audio/transcriptions", "/v1/audio/translations"):
        app.add_route(_preflight, uri, methods=["OPTIONS"], name=f"options_{uri.strip('/').replace('/', '_')}")


async def _preflight(request: Request, **_: str) -> HTTPResponse:
    return HTTPResponse(status=204)
