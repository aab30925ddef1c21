"""An OpenAPI description of the server and an offline /docs page that renders it (no CDN, no scripts fetched)."""
from __future__ import annotations

import re

_ERROR = {"type": "object", "properties": {"error": {"type": "object", "properties": {
    "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": "string", "nullable": True},
    "code": {"type": "string", "nullable": True}}}}}
_JSON = "application/json"
_FORM = "multipart/form-data"

# (method, path, summary, auth, request example or None[, its content type: JSON unless named])
ENDPOINTS = [
    ("get", "/health", "Liveness: 200 while the process is up (no key needed).", False, None),
    ("get", "/health/ready", "Readiness: 503 with the startup phase until the model can serve, then 200.", False,
     None),
    ("get", "/v1/models", "List the served model names (every alias), with root and max_model_len.", True, None),
    ("get", "/v1/models/{model}", "One model; ids may contain '/'. Unknown: 404 model_not_found.", True, None),
    ("post", "/v1/completions", "Text completion (OpenAI legacy API, plus vLLM's extra sampling parameters).", True,
     {"model": "MODEL", "prompt": "Once upon a time", "max_tokens": 16, "stream": False}),
    ("post", "/v1/chat/completions", "Chat completion through the model's chat template; streaming as SSE.", True,
     {"model": "MODEL", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 32}),
    ("post", "/v1/responses", "OpenAI's Responses API over the chat path: input items, function tools, text.format, "
     "typed SSE events, store, previous_response_id, background.", True,
     {"model": "MODEL", "input": "Hello!", "max_output_tokens": 32}),
    ("get", "/v1/responses/{response_id}", "A stored response. Unknown: 404.", True, None),
    ("delete", "/v1/responses/{response_id}", "Delete a stored response (a running one is cancelled first).", True,
     None),
    ("post", "/v1/responses/{response_id}/cancel", "Cancel a background response (its engine request is aborted).",
     True, None),
    ("get", "/v1/responses/{response_id}/input_items", "A stored response's input items (order, limit, after).", True,
     None),
    ("post", "/v1/embeddings", "Embeddings (embedding models only).", True, {"model": "MODEL", "input": "text"}),
    ("post", "/pooling", "A pooling model's output per input (vLLM's shape): task embed, classify, token_embed.", True,
     {"model": "MODEL", "input": ["text"], "task": "embed"}),
    ("post", "/classify", "A classifier's label and probabilities per input (vLLM's shape).", True,
     {"model": "MODEL", "input": ["text"]}),
    ("post", "/score", "Pair scores: cross-encoder, or cosine of embeddings (vLLM's shape; also /v1/score).", True,
     {"model": "MODEL", "text_1": "query", "text_2": ["document one", "document two"]}),
    ("post", "/rerank", "Documents by relevance to a query (Jina's shape; also /v1/rerank).", True,
     {"model": "MODEL", "query": "query", "documents": ["document one", "document two"], "top_n": 1}),
    ("post", "/v2/rerank", "Documents by relevance to a query (Cohere's v2 shape).", True,
     {"model": "MODEL", "query": "query", "documents": ["document one", "document two"], "return_documents": True}),
    ("post", "/v1/audio/transcriptions", "Speech to text with a speech model (Whisper): a multipart upload; "
     "response_format json, text, srt, vtt or verbose_json; stream (vLLM's transcription.chunk events).", True,
     {"file": "(audio: wav, flac, mp3, ogg, webm, m4a)", "model": "MODEL", "response_format": "json"}, _FORM),
    ("post", "/v1/audio/translations", "Speech in any language to English text (multilingual Whisper models).",
     True, {"file": "(audio)", "model": "MODEL"}, _FORM),
    ("get", "/v1/realtime", "WebSocket: vLLM's realtime transcription (session.update, input_audio_buffer.append "
     "with base64 PCM16, input_audio_buffer.commit -> transcription.delta / transcription.done).", True, None),
    ("post", "/tokenize", "Text or messages -> token ids (vLLM's shape).", False, {"prompt": "Hello"}),
    ("post", "/detokenize", "Token ids -> text (vLLM's shape).", False, {"tokens": [19556]}),
    ("get", "/version", "Server version.", False, None),
    ("get", "/metrics", "Prometheus metrics under the llm: prefix.", False, None),
]


def openapi_spec(title: str = "llm OpenAI-compatible server", version: str = "0") -> dict:
    paths: dict = {}
    for method, path, summary, auth, example, *content_type in ENDPOINTS:
        op: dict = {"summary": summary, "responses": {
            "200": {"description": "OK"},
            "4XX": {"description": "OpenAI-shaped error", "content": {_JSON: {"schema": _ERROR}}}}}
        if auth:
            op["security"] = [{"bearer": []}]
        names = re.findall(r"\{(\w+)\}", path)
        if names:
            op["parameters"] = [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
                                for n in names]
        if example is not None:
            op["requestBody"] = {"required": True, "content": {(content_type or [_JSON])[0]: {
                "schema": {"type": "object"}, "example": example}}}
        paths.setdefault(path, {})[method] = op
    return {"openapi": "3.0.3", "info": {"title": title, "version": version}, "paths": paths,
            "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}}}


DOCS_HTML = """<!doctype html>
<html><head><meta charset="utf-8"><title>API docs</title>
<style>
body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
.op{border:1px solid #ddd;border-radius:6px;margin:.6rem 0;padding:.6rem .8rem}
.m{display:inline-block;min-width:4rem;font-weight:bold;text-transform:uppercase}
.get{color:#1565c0}.post{color:#2e7d32} code,pre{background:#f5f5f5;padding:.1rem .3rem;border-radius:3px}
pre{padding:.6rem;overflow:auto}.lock{color:#999;font-size:.85em}
</style></head><body>
<h1 id="title">API</h1><p>Machine-readable description: <a href="/openapi.json">/openapi.json</a>.
Errors always have the shape <code>{"error": {"message", "type", "param", "code"}}</code>.</p>
<div id="ops"></div>
<script>
fetch("/openapi.json").then(r => r.json()).then(spec => {
  document.getElementById("title").textContent = spec.info.title;
  const root = document.getElementById("ops");
  for (const [path, ops] of Object.entries(spec.paths)) {
    for (const [method, op] of Object.entries(ops)) {
      const div = document.createElement("div"); div.className = "op";
      const head = document.createElement("div");
      const m = document.createElement("span"); m.className = "m " + method; m.textContent = method;
      const p = document.createElement("code"); p.textContent = path;
      head.append(m, p);
      if (op.security) { const l = document.createElement("span"); l.className = "lock";
        l.textContent = "  (Bearer key)"; head.append(l); }
      const s = document.createElement("p"); s.textContent = op.summary;
      div.append(head, s);
      const ex = op.requestBody && Object.values(op.requestBody.content)[0].example;
      if (ex) { const pre = document.createElement("pre"); pre.textContent = JSON.stringify(ex, null, 2);
        div.append(pre); }
      root.append(div);
    }
  }
});
</script></body></html>
"""
