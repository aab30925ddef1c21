"""Each provider's own "list models" call, and its answer translated to one shape.

OpenAI-compatible servers (OpenAI, NIM, vLLM, TRT-LLM, ours): GET {base}/models -> {"data": [{"id", ...}]}.
Anthropic: GET {base}/v1/models (x-api-key, anthropic-version) -> {"data": [{"id", "display_name",
"created_at"}], "has_more", "last_id"}, paged with after_id. Azure OpenAI: GET {endpoint}/openai/models
?api-version= (api-key) -> {"data": [{"id", "created_at", "capabilities": {...}}]}. Cohere: GET
{base}/v1/models (Bearer) -> {"models": [{"name", "endpoints", "context_length"}], "next_page_token"}.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

ANTHROPIC_VERSION = "2023-06-01"
# Cohere endpoints / Azure capability flags -> our capability names
_COHERE = {"chat": "chat", "generate": "completion", "embed": "embedding", "rerank": "rerank",
           "classify": "classify"}
_AZURE = {"chat_completion": "chat", "completion": "completion", "embeddings": "embedding"}


@dataclass(frozen=True, slots=True)
class ListedModel:
    """One entry of an upstream's listing, in our terms."""
    id: str
    created: int = 0
    owned_by: str | None = None
    capabilities: tuple[str, ...] = ()         # empty: the listing did not say
    context_window: int | None = None
    extra: dict = field(default_factory=dict)  # the rest of an OpenAI-shaped card (root, parent, ...)


def listing_request(engine: str, base_url: str, api_version: str | None, key: str | None,
                    page: str | None) -> tuple[str, dict, dict]:
    """(url, query parameters, headers) of one page of the listing."""
    if engine == "anthropic":
        params = {"limit": 1000, **({"after_id": page} if page else {})}
        headers = {"anthropic-version": ANTHROPIC_VERSION, **({"x-api-key": key} if key else {})}
        return f"{base_url}/v1/models", params, headers
    if engine == "azure":
        return f"{base_url}/openai/models", {"api-version": api_version}, ({"api-key": key} if key else {})
    auth = {"Authorization": f"Bearer {key}"} if key else {}
    if engine == "cohere":
        return f"{base_url}/v1/models", {"page_size": 1000, **({"page_token": page} if page else {})}, auth
    return f"{base_url}/models", {}, auth


def parse_listing(engine: str, payload: dict) -> tuple[list[ListedModel], str | None]:
    """The models of one page and the next page's token (None: the last page). Raises ValueError,
    KeyError or TypeError on an answer of the wrong shape."""
    if not isinstance(payload, dict):
        raise ValueError("not a JSON object")
    if engine == "cohere":
        models = [ListedModel(m["name"], capabilities=tuple(dict.fromkeys(_COHERE[e] for e in m.get("endpoints", [])
                                                                           if e in _COHERE)),
                              context_window=m.get("context_length"), owned_by="cohere")
                  for m in payload["models"]]
        return models, payload.get("next_page_token") or None
    entries = payload["data"]
    if not isinstance(entries, list):
        raise ValueError("'data' is not a list")
    if engine == "anthropic":
        models = [ListedModel(m["id"], _epoch(m.get("created_at")), "anthropic", ("chat",),
                              extra={"display_name": m.get("display_name")}) for m in entries]
        return models, (payload.get("last_id") if payload.get("has_more") else None)
    if engine == "azure":
        models = [ListedModel(m["id"], int(m.get("created_at") or 0), "azure",
                              tuple(ours for flag, ours in _AZURE.items() if (m.get("capabilities") or {}).get(flag)))
                  for m in entries]
        return models, None
    models = []
    for m in entries:
        caps = m.get("capabilities")
        context = m.get("context_window") or m.get("max_model_len") or m.get("context_length")
        models.append(ListedModel(
            str(m["id"]), int(m.get("created") or 0), m.get("owned_by"),
            tuple(caps) if isinstance(caps, list) else (), int(context) if isinstance(context, int) else None,
            extra={k: m[k] for k in ("root", "parent") if k in m}))
    return models, None


def _epoch(stamp: str | None) -> int:
    """RFC 3339 (Anthropic's created_at) -> Unix seconds; 0 when absent or unreadable."""
    if not stamp:
        return 0
    try:
        return int(datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return 0
