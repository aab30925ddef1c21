"""HTTP side of the benchmark: one streamed request -> RequestResult, and the server's tokenizer."""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Sequence

from launcher.bench.metrics import RequestResult

import httpx

ENDPOINT_PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


def base_url(url: str) -> str:
    """Server root from a URL given with or without a trailing /v1."""
    return url.rstrip("/").removesuffix("/v1")


@dataclass(frozen=True, slots=True)
class Target:
    """Where and how requests are sent."""
    url: str                         # server root, e.g. http://127.0.0.1:8000
    endpoint: str                    # completions | chat
    model: str
    api_key: str | None = None
    ignore_eos: bool = False
    extra_body: dict = field(default_factory=dict)

    @property
    def request_url(self) -> str:
        return base_url(self.url) + ENDPOINT_PATHS[self.endpoint]

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def payload(self, prompt: str, output_len: int) -> dict[str, Any]:
        """Greedy, streamed, with a final usage chunk; ignore_eos only when asked (not every server knows it)."""
        body: dict[str, Any] = {"model": self.model, "temperature": 0.0, "stream": True,
                                "stream_options": {"include_usage": True}}
        if self.endpoint == "chat":
            body |= {"messages": [{"role": "user", "content": prompt}], "max_completion_tokens": output_len}
        else:
            body |= {"prompt": prompt, "max_tokens": output_len}
        if self.ignore_eos:
            body["ignore_eos"] = True
        return body | self.extra_body


def chunk_output(data: dict) -> str | None:
    """The generated piece a streamed chunk carries (None for chunks without choices, e.g. usage).
    A chat delta holding only the role counts as no output: some servers send it before the first token."""
    choices = data.get("choices")
    if not choices:
        return None
    choice = choices[0]
    if "text" in choice:
        return choice["text"] or ""
    delta = choice.get("delta") or {}
    calls = delta.get("tool_calls") or []
    return (delta.get("content") or "") + (delta.get("reasoning_content") or delta.get("reasoning") or "") + \
        "".join((c.get("function") or {}).get("arguments") or "" for c in calls)


async def stream_request(client: httpx.AsyncClient, target: Target, prompt: str, prompt_len: int,
                         output_len: int) -> RequestResult:
    """Send one streamed request and time it: TTFT at the first chunk with output, one ITL per later chunk
    with output, E2EL at the last data chunk. Token counts come from the final usage chunk when sent."""
    start = time.perf_counter()
    first = last = last_output = None
    itl: list[float] = []
    pieces: list[str] = []
    usage: dict = {}
    num_output_chunks = 0
    try:
        async with client.stream("POST", target.request_url, json=target.payload(prompt, output_len),
                                 headers=target.headers()) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode("utf-8", "replace")[:300]
                return RequestResult(False, prompt_len, start_time=start,
                                     error=f"HTTP {response.status_code}: {body}")
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, SSE comments (keep-alive pings), event names
                chunk = line[5:].strip()
                if chunk == "[DONE]":
                    break
                now = time.perf_counter()
                data = json.loads(chunk)
                if "error" in data:
                    message = (data["error"] or {}).get("message", data["error"])
                    return RequestResult(False, prompt_len, start_time=start, error=f"stream error: {message}")
                last = now
                usage = data.get("usage") or usage
                piece = chunk_output(data)
                if piece:
                    if first is None:
                        first = now
                    else:
                        itl.append(now - last_output)
                    last_output = now
                    num_output_chunks += 1
                    pieces.append(piece)
    except (httpx.HTTPError, OSError, ValueError) as exc:
        return RequestResult(False, prompt_len, start_time=start, error=f"{type(exc).__name__}: {exc}")
    if first is None:
        return RequestResult(False, prompt_len, start_time=start, error="the stream carried no output")
    return RequestResult(
        True, prompt_len=usage.get("prompt_tokens") or prompt_len,
        output_len=usage.get("completion_tokens") or 0,  # 0: counted later (see serve.count_outputs)
        ttft=first - start, itl=tuple(itl), latency=last - start, start_time=start,
        generated_text="".join(pieces),
        # NOTE: without usage, the chunk count stands in until serve.count_outputs re-counts the text.
        output_chunks=num_output_chunks)


class ServerTokenizer:
    """The server's own tokenizer via POST /tokenize and /detokenize (blocking; used before the timed run only),
    in vLLM's shapes ({"model", "prompt"} -> {"tokens"}; {"model", "tokens"} -> {"prompt"}, ours too) or
    llama.cpp's server's ({"content"} -> {"tokens"}; {"tokens"} -> {"content"}), whichever the server speaks."""

    def __init__(self, url: str, model: str, api_key: str | None = None, timeout: float = 30.0):
        self.root, self.model, self.api_key, self.timeout = base_url(url), model, api_key, timeout
        self.dialect: str | None = None   # 'vllm' | 'llama.cpp', found by available()

    def _post(self, path: str, body: dict) -> dict:
        request = urllib.request.Request(self.root + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        if self.api_key:
            request.add_header("Authorization", f"Bearer {self.api_key}")
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return json.loads(response.read())

    def encode(self, text: str) -> list:
        if self.dialect == "llama.cpp":
            return list(self._post("/tokenize", {"content": text, "add_special": False})["tokens"])
        body = {"model": self.model, "prompt": text, "add_special_tokens": False}
        return list(self._post("/tokenize", body)["tokens"])

    def decode(self, tokens: Sequence) -> str:
        if self.dialect == "llama.cpp":
            return self._post("/detokenize", {"tokens": list(tokens)})["content"]
        return self._post("/detokenize", {"model": self.model, "tokens": list(tokens)})["prompt"]

    def available(self) -> bool:
        """Whether the server round-trips text through /tokenize and /detokenize in one of the two shapes."""
        for dialect in ("vllm", "llama.cpp"):
            self.dialect = dialect
            try:
                if self.decode(self.encode("hello world")).strip() == "hello world":
                    return True
            except (OSError, urllib.error.URLError, ValueError, KeyError, TypeError):
                pass
        self.dialect = None
        return False


def fetch_first_model(url: str, api_key: str | None = None) -> str:
    """The first id in GET /v1/models (what `--model` defaults to)."""
    from launcher.model_catalog import list_server_models
    models = list_server_models(url, api_key)
    if not models:
        raise RuntimeError(f"{base_url(url)}/v1/models lists no models; pass --model")
    return models[0]["id"]
