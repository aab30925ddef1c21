"""Request/response middleware: request ids, Bearer auth (/v1/*, /v2/*, the pooling endpoints), CORS, per-route
counters, request logs."""
from __future__ import annotations

import hmac
import logging
import re
import time
import uuid

from sanic import HTTPResponse, Sanic
from sanic.request import Request

from launcher.server.errors import APIError

log = logging.getLogger("llm.server")
_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,256}$")    # printable ASCII, no spaces: safe to echo in a header
_CORS_HEADERS = "Authorization, Content-Type, X-Request-Id, OpenAI-Organization, OpenAI-Project"


def install(app: Sanic) -> None:
    app.register_middleware(_on_request, "request")
    app.register_middleware(_on_response, "response")


def _check_key(header: str | None, keys: tuple[str, ...]) -> bool:
    """Constant time in the key's content: every configured key is compared, whatever matches."""
    if not header or not header.startswith("Bearer "):
        return False
    given = header[len("Bearer "):].strip().encode()
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(given, key.encode())
    return ok


# Paths that need a key when the server has keys: the OpenAI API, and the model endpoints beside it (vLLM leaves
# /score, /rerank, /pooling, /classify open; they run the model, so here they are keyed too).
_KEYED_PATHS = ("/v1/", "/v2/", "/pooling", "/classify", "/score", "/rerank")


async def _on_request(request: Request) -> HTTPResponse | None:
    settings = request.app.ctx.state.settings
    incoming = request.headers.get("x-request-id")
    request.ctx.request_id = incoming if incoming and _REQUEST_ID.match(incoming) else uuid.uuid4().hex
    request.ctx.started = time.monotonic()
    if request.method == "OPTIONS":
        return HTTPResponse(status=204)   # a CORS preflight; headers are added on the way out
    if settings.api_keys and request.path.startswith(_KEYED_PATHS) and \
            not _check_key(request.headers.get("authorization"), settings.api_keys):
        raise APIError(401, "Incorrect API key provided. Pass a valid key as 'Authorization: Bearer <key>'.",
                       "invalid_request_error", None, "invalid_api_key")
    return None


async def _on_response(request: Request, response: HTTPResponse) -> None:
    state = request.app.ctx.state
    settings = state.settings
    request_id = getattr(request.ctx, "request_id", None) or uuid.uuid4().hex
    response.headers["X-Request-Id"] = request_id
    if settings.replica_id:   # which Ray Serve replica answered (the proxy in front hides it)
        response.headers["X-LLM-Replica"] = settings.replica_id
    origin = request.headers.get("origin")
    if settings.cors_origins and origin:
        if "*" in settings.cors_origins:
            response.headers["Access-Control-Allow-Origin"] = "*"
        elif origin in settings.cors_origins:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Vary"] = "Origin"
        if request.method == "OPTIONS" and "Access-Control-Allow-Origin" in response.headers:
            response.headers["Access-Control-Allow-Methods"] = "GET, POST, DELETE, OPTIONS"
            response.headers["Access-Control-Allow-Headers"] = _CORS_HEADERS
            response.headers["Access-Control-Max-Age"] = "600"
        response.headers["Access-Control-Expose-Headers"] = "X-Request-Id, X-LLM-Replica" if settings.replica_id \
            else "X-Request-Id"
    route = request.route.path if request.route else "(unmatched)"
    state.http_requests[("/" + route.lstrip("/"), response.status)] += 1
    if settings.log_requests:
        elapsed = time.monotonic() - getattr(request.ctx, "started", time.monotonic())
        log.info("%s %s %d %.3fs id=%s", request.method, request.path, response.status, elapsed, request_id)
