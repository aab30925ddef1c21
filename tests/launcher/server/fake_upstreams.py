"""Loopback servers that answer as hosted providers document it, for the upstreams a server routes to.

OpenAI-compatible (with misbehaving models: a 500, invalid JSON, a stream cut mid-way, a slow answer, a 401),
and the model listings of Anthropic (paged with has_more / after_id, x-api-key + anthropic-version), Azure
OpenAI (/openai/models?api-version=, api-key) and Cohere (paged with next_page_token, Bearer)."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

SLOW_S = 4.0   # the "slow" model answers after this long (the test upstream's timeout_s is shorter)

ANTHROPIC_PAGES = {
    None: {"data": [{"type": "model", "id": "claude-sonnet-4-20250514", "display_name": "Claude Sonnet 4",
                     "created_at": "2025-05-22T00:00:00Z"}],
           "has_more": True, "first_id": "claude-sonnet-4-20250514", "last_id": "claude-sonnet-4-20250514"},
    "claude-sonnet-4-20250514": {
        "data": [{"type": "model", "id": "claude-3-5-haiku-20241022", "display_name": "Claude Haiku 3.5",
                  "created_at": "2024-10-22T00:00:00Z"}],
        "has_more": False, "first_id": "claude-3-5-haiku-20241022", "last_id": "claude-3-5-haiku-20241022"},
}
AZURE_MODELS = {"object": "list", "data": [
    {"id": "gpt-4o", "status": "succeeded", "created_at": 1715558400, "object": "model", "lifecycle_status": "generally-available",
     "capabilities": {"chat_completion": True, "completion": False, "embeddings": False, "fine_tune": False,
                      "inference": True}},
    {"id": "text-embedding-3-small", "status": "succeeded", "created_at": 1705968000, "object": "model",
     "capabilities": {"chat_completion": False, "completion": False, "embeddings": True, "fine_tune": False,
                      "inference": True}}]}
COHERE_PAGES = {
    None: {"models": [{"name": "command-r-08-2024", "endpoints": ["generate", "chat", "summarize"],
                       "finetuned": False, "context_length": 128000, "default_endpoints": ["chat"]}],
           "next_page_token": "p2"},
    "p2": {"models": [{"name": "embed-english-v3.0", "endpoints": ["embed", "classify"], "finetuned": False,
                       "context_length": 512, "default_endpoints": ["embed"]}]},
}
OPENAI_MODELS = ("ok", "fail500", "badjson", "cut", "slow", "denied")


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass   # a client that gave up on the slow model: nothing to report


class FakeProviders:
    """One threaded HTTP server answering every provider's shape (by path); records each request."""

    def __init__(self):
        self.requests: list[dict] = []   # {"method", "path", "query", "headers", "body"}
        providers = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                providers._record(self, None)
                providers._get(self)

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                providers._record(self, body)
                providers._post(self, body)

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _record(self, handler, body) -> None:
        parsed = urlparse(handler.path)
        self.requests.append({"method": handler.command, "path": parsed.path, "query": parse_qs(parsed.query),
                              "headers": {k.lower(): v for k, v in handler.headers.items()}, "body": body})

    def last(self, path: str) -> dict:
        return next(r for r in reversed(self.requests) if r["path"] == path)

    @staticmethod
    def _json(handler, status: int, payload) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def _get(self, handler) -> None:
        parsed = urlparse(handler.path)
        query = parse_qs(parsed.query)
        if parsed.path == "/openai/v1/models":          # an OpenAI-compatible base URL: {url}/openai/v1
            return self._json(handler, 200, {"object": "list", "data": [
                {"id": m, "object": "model", "created": 1700000000, "owned_by": "fake"} for m in OPENAI_MODELS]})
        if parsed.path == "/anthropic/v1/models":
            return self._json(handler, 200, ANTHROPIC_PAGES[query.get("after_id", [None])[0]])
        if parsed.path == "/azure/openai/models":
            return self._json(handler, 200, AZURE_MODELS)
        if parsed.path == "/cohere/v1/models":
            return self._json(handler, 200, COHERE_PAGES[query.get("page_token", [None])[0]])
        if parsed.path == "/broken/v1/models":
            return self._json(handler, 200, b"<html>not json")
        self._json(handler, 404, {"error": {"message": "no such route", "type": "invalid_request_error"}})

    def _post(self, handler, body: dict) -> None:
        model = body.get("model")
        if model == "fail500":
            return self._json(handler, 500, {"error": {"message": "the upstream fell over", "type": "server_error"}})
        if model == "badjson":
            return self._json(handler, 200, b"{this is not json")
        if model == "denied":
            return self._json(handler, 401, {"error": {"message": "Incorrect API key provided", "type":
                                                       "invalid_request_error", "code": "invalid_api_key"}})
        if model == "slow":
            time.sleep(SLOW_S)
        if body.get("stream"):
            return self._stream(handler, cut=model == "cut")
        self._json(handler, 200, {"id": "chatcmpl-fake", "object": "chat.completion", "created": 1, "model": model,
                                  "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"},
                                               "finish_reason": "stop"}],
                                  "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})

    @staticmethod
    def _stream(handler, cut: bool) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()

        def chunk(data: bytes) -> None:
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            handler.wfile.flush()

        for piece in ("hel", "lo"):
            event = {"id": "c", "object": "chat.completion.chunk", "choices": [
                {"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
            chunk(b"data: " + json.dumps(event).encode() + b"\n\n")
            time.sleep(0.05)
        if cut:   # the connection drops mid-stream: no last chunk, no [DONE]
            handler.close_connection = True
            handler.connection.shutdown(2)
            return
        chunk(b"data: [DONE]\n\n")
        handler.wfile.write(b"0\r\n\r\n")
