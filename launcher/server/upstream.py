"""Upstream: a server (or a provider's API) whose models this server serves — its model listing, cached and
translated to OpenAI's shape, and the proxy that relays requests to it (SSE chunk by chunk, as it arrives)."""
from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import orjson
from sanic import HTTPResponse
from sanic.request import Request

from launcher.providers import provider
from launcher.server.errors import APIError
from launcher.server.provider_listings import ListedModel, listing_request, parse_listing
from launcher.server.settings import UpstreamSettings
from launcher.server.sse import DONE, HEADERS, event

if TYPE_CHECKING:   # imported on first use: a server without upstreams never loads the HTTP client
    import aiohttp

log = logging.getLogger("llm.server")

ENDPOINTS = ("chat/completions", "completions", "embeddings", "tokenize", "detokenize",
             "pooling", "classify", "score", "rerank", "v2/rerank")
_BESIDE_V1 = ("tokenize", "detokenize", "pooling", "classify", "score", "rerank", "v2/rerank")
_RETRY_LISTING_S = 1.0   # while an upstream is down, its listing is asked for again at most this often


@dataclass(frozen=True, slots=True)
class UpstreamModel:
    """One model an upstream serves, as this server names it (the upstream's id with the prefix)."""
    id: str
    upstream_id: str
    listed: ListedModel | None = None     # what the upstream's listing said (None for explicit ids)


@dataclass(frozen=True, slots=True)
class UpstreamRoute:
    """Where a request for an upstream model goes."""
    upstream: "Upstream"
    model: UpstreamModel

    async def proxy(self, request: Request, endpoint: str, body: dict, server_has_keys: bool) -> HTTPResponse | None:
        return await self.upstream.proxy(request, endpoint, body, self.model, server_has_keys)


@dataclass(slots=True)
class _Listing:
    models: list[UpstreamModel] = field(default_factory=list)
    fetched_at: float = float("-inf")     # time.monotonic() of the last successful fetch
    failed_at: float = float("-inf")
    error: str | None = None              # why the last fetch failed (None: it worked)


class Upstream:
    def __init__(self, settings: UpstreamSettings):
        self.settings = settings
        self.provider = provider(settings.engine)
        self._listing = _Listing()
        self._lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def is_proxied(self) -> bool:
        """Requests go through as they are (OpenAI-compatible); anthropic and cohere models are only listed."""
        return self.provider.openai_compatible

    def _http(self) -> aiohttp.ClientSession:
        """One pooled session per upstream (aiohttp: ~2 ms less per request than httpx on the dev machine).
        timeout_s bounds connecting and every read: a slow first byte, and a stream that stalls."""
        import aiohttp
        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.settings.timeout_s,
                                            sock_read=self.settings.timeout_s)
            self._session = aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0),
                                                  skip_auto_headers=("User-Agent",))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    # -- the listing ----------------------------------------------------------------------------

    def forwarded(self, authorization: str | None, server_has_keys: bool) -> str | None:
        """The caller's Authorization, when it is to be sent upstream: only while this server has no keys of
        its own (a key that authenticates a client to us is never sent on) and forwarding is on."""
        if authorization and self.settings.forward_authorization and not server_has_keys:
            return authorization
        return None

    async def models(self, authorization: str | None = None) -> list[UpstreamModel]:
        """What it serves now: explicit ids as configured, or ["*"]: its own listing (cached for refresh_s,
        asked for with `authorization` (a forwarded caller's) or the upstream's own key). Raises APIError
        when the listing cannot be had (the upstream's 401/403 as it came, else 502/504)."""
        s = self.settings
        if s.models != ("*",):
            return [UpstreamModel(s.prefix + m, m) for m in s.models]
        listing, refused = await self._refreshed(authorization)
        if refused is not None:
            raise refused
        if listing.error is not None:
            raise APIError(502, f"upstream {self.name!r} is unreachable: {listing.error}", "upstream_error",
                           code="upstream_unavailable")
        return listing.models

    async def find(self, name: str, authorization: str | None = None) -> UpstreamModel | None:
        """The upstream model a request's `model` names, if this upstream serves it. While the upstream is
        down the last listing still routes (the request then gets a 502), so an outage is never a 404."""
        s = self.settings
        if not name.startswith(s.prefix):
            return None
        if s.models != ("*",):
            return UpstreamModel(name, name[len(s.prefix):]) if name[len(s.prefix):] in s.models else None
        listing = self._listing
        if not any(m.id == name for m in listing.models):
            listing, _ = await self._refreshed(authorization, force=True)
        return next((m for m in listing.models if m.id == name), None)

    async def _refreshed(self, authorization: str | None,
                         force: bool = False) -> tuple[_Listing, APIError | None]:
        """The listing, fetched again when stale (or forced). A refusal (the upstream's 401/403 to this
        caller's key) is returned beside the listing, which it leaves as it was: it is not an outage."""
        async with self._lock:
            listing, now = self._listing, time.monotonic()
            fresh = listing.error is None and now - listing.fetched_at < self.settings.refresh_s
            retry_too_soon = now - (listing.failed_at if listing.error is not None else listing.fetched_at) \
                < _RETRY_LISTING_S   # an unknown name asks again at most this often, and so does an outage
            if (fresh and not force) or (retry_too_soon and (force or listing.error is not None)) \
                    or self.settings.base_url is None:
                return listing, None
            try:
                models = await self._fetch_listing(authorization)
            except APIError as e:
                if e.status in (401, 403):
                    return listing, e
                if listing.error is None:   # once per outage
                    log.warning("upstream %r: its model listing failed, leaving it out of /v1/models: %s",
                                self.name, e.message)
                listing.error, listing.failed_at = e.message, now
                return listing, None
            if listing.error is not None:
                log.info("upstream %r is back: %d models", self.name, len(models))
            self._listing = _Listing(models, now)
            return self._listing, None

    async def _fetch_listing(self, authorization: str | None) -> list[UpstreamModel]:
        import aiohttp
        s, listed, page = self.settings, [], None
        while True:
            url, params, headers = listing_request(self.provider.engine, s.base_url, s.api_version, self._key(), page)
            if authorization:   # a forwarded caller's header stands in for the upstream's own key
                headers = {k: v for k, v in headers.items() if k not in ("Authorization", "api-key", "x-api-key")}
                headers["Authorization"] = authorization
            try:
                async with self._http().get(url, params={k: str(v) for k, v in params.items()},
                                            headers=headers) as response:
                    status, content = response.status, await response.read()
            except asyncio.TimeoutError:
                raise APIError(504, f"no answer within {s.timeout_s:g} s", "upstream_error") from None
            except aiohttp.ClientError as e:
                raise APIError(502, f"{type(e).__name__}: {e}", "upstream_error") from None
            if status in (401, 403):
                raise APIError(status, f"upstream {self.name!r} refused to list its models ({status}): check the "
                               "key", code="upstream_unauthorized")
            if status != 200:
                raise APIError(502, f"GET {url} answered {status}", "upstream_error")
            try:
                models, page = parse_listing(self.provider.engine, orjson.loads(content))
            except (orjson.JSONDecodeError, ValueError, TypeError, KeyError) as e:
                raise APIError(502, f"GET {url} answered something that is not a model list ({e})",
                               "upstream_error") from None
            listed += models
            if page is None:
                return [UpstreamModel(s.prefix + m.id, m.id, m) for m in listed]

    def _key(self) -> str | None:
        env = self.settings.api_key_env
        return os.environ.get(env) or None if env else None

    # -- the proxy ------------------------------------------------------------------------------

    def _auth(self, request: Request, server_has_keys: bool) -> dict[str, str]:
        """The caller's Authorization when it may be forwarded, else the upstream's own key."""
        incoming = self.forwarded(request.headers.get("authorization"), server_has_keys)
        if incoming:
            return {"Authorization": incoming}
        key = self._key()
        if key is None:
            return {}
        return {"api-key": key} if self.provider.engine == "azure" else {"Authorization": f"Bearer {key}"}

    def _url(self, endpoint: str, upstream_id: str) -> str:
        base = self.settings.base_url
        if self.provider.engine == "azure":
            if endpoint in _BESIDE_V1:
                raise APIError(400, f"upstream {self.name!r} (azure) has no /{endpoint}", param="model",
                               code="not_supported")
            return f"{base}/openai/deployments/{upstream_id}/{endpoint}?api-version={self.settings.api_version}"
        if endpoint in _BESIDE_V1:   # vLLM's (and our) /tokenize, /score, ... sit beside /v1, not under it
            return f"{base.removesuffix('/v1')}/{endpoint}"
        return f"{base}/{endpoint}"

    async def proxy(self, request: Request, endpoint: str, body: dict, model: UpstreamModel,
                    server_has_keys: bool) -> HTTPResponse | None:
        """Relay one request: the body as it came with only `model` rewritten; the answer as it comes."""
        import aiohttp
        if endpoint not in ENDPOINTS:   # /v1/responses keeps its state here: local models only
            raise APIError(400, f"`{model.id}` is a model of upstream {self.name!r}; /v1/{endpoint} serves this "
                           "server's local models only", param="model", code="model_not_supported")
        if not self.is_proxied:
            raise APIError(400, f"`{model.id}` is a model of upstream {self.name!r} ({self.provider.engine}), "
                           "which is listed here but not proxied: its API is not OpenAI-compatible",
                           param="model", code="model_not_supported")
        if self.settings.base_url is None:
            raise APIError(502, f"upstream {self.name!r} has no base URL", "upstream_error",
                           code="upstream_unavailable")
        headers = {"Content-Type": "application/json", "X-Request-Id": request.ctx.request_id,
                   **self._auth(request, server_has_keys)}
        payload = orjson.dumps({**body, "model": model.upstream_id})
        url = self._url(endpoint, model.upstream_id)
        try:
            upstream = await self._http().post(url, data=payload, headers=headers)
        except asyncio.TimeoutError:
            raise self._timeout() from None
        except aiohttp.ClientError as e:
            raise APIError(502, f"upstream {self.name!r} is unreachable: {type(e).__name__}: {e}", "upstream_error",
                           code="upstream_unavailable") from None
        try:
            if upstream.status >= 400:
                return self._error(upstream.status, await self._read(upstream))
            if upstream.content_type == "text/event-stream":
                await self._relay(request, upstream)
                return None
            content = await self._read(upstream)
            try:
                orjson.loads(content)
            except orjson.JSONDecodeError:
                raise APIError(502, f"upstream {self.name!r} answered with invalid JSON", "upstream_error",
                               code="upstream_bad_response") from None
            return HTTPResponse(content, status=upstream.status, content_type="application/json")
        finally:
            if upstream.content.at_eof():
                upstream.release()   # back to the pool
            else:
                upstream.close()     # a client that left: the upstream sees the connection go, and stops

    def _timeout(self) -> APIError:
        return APIError(504, f"upstream {self.name!r} did not answer within {self.settings.timeout_s:g} s",
                        "upstream_error", code="upstream_timeout")

    async def _read(self, upstream: aiohttp.ClientResponse) -> bytes:
        import aiohttp
        try:
            return await upstream.read()
        except asyncio.TimeoutError:
            raise self._timeout() from None
        except aiohttp.ClientError as e:
            raise APIError(502, f"upstream {self.name!r} broke off its answer: {type(e).__name__}: {e}",
                           "upstream_error", code="upstream_bad_response") from None

    def _error(self, status: int, content: bytes) -> HTTPResponse:
        """An upstream 4xx goes to the client as it is (in OpenAI's shape); a 5xx is this gateway's 502."""
        try:
            parsed = orjson.loads(content)
        except orjson.JSONDecodeError:
            parsed = None
        text = content.decode("utf-8", "replace")[:300]
        if status < 500:
            if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):   # OpenAI's envelope, completed
                error = {"message": None, "type": None, "param": None, "code": None, **parsed["error"]}
                return HTTPResponse(orjson.dumps({**parsed, "error": error}), status=status,
                                    content_type="application/json")
            return APIError(status, f"upstream {self.name!r}: {text}", code="upstream_error").response()
        detail = parsed["error"].get("message") if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict) \
            else text
        return APIError(502, f"upstream {self.name!r} failed with {status}: {detail}", "upstream_error",
                        code="upstream_error").response()

    async def _relay(self, request: Request, upstream: aiohttp.ClientResponse) -> None:
        """SSE chunk by chunk as the upstream sends them. A stream that breaks off (or ends without [DONE])
        gets a final error event and [DONE], so the client always sees a well-formed end."""
        import aiohttp
        response = await request.respond(content_type="text/event-stream; charset=utf-8", headers=HEADERS)
        tail = b""
        try:
            async for chunk in upstream.content.iter_any():   # whatever has arrived, at once
                tail = (tail + chunk)[-len(DONE) - 8:]
                if DONE.strip() in tail:
                    # NOTE: the upstream's end of body follows [DONE] at once: read it before the client gets
                    # [DONE] (and may hang up), so the connection to the upstream goes back to the pool
                    chunk += await upstream.content.read()
                await response.send(chunk)
            ended = DONE.strip() in tail
            problem = None if ended else "the upstream's stream ended without [DONE]"
        except asyncio.TimeoutError:
            problem = f"the upstream sent nothing for {self.settings.timeout_s:g} s"
        except aiohttp.ClientError as e:
            problem = f"the upstream's stream broke off ({type(e).__name__})"
        if problem is not None:
            error = APIError(502, f"upstream {self.name!r}: {problem}", "upstream_error", code="upstream_stream_error")
            await response.send(event(error.body()) + DONE)
        await response.eof()
