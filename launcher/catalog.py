"""The model catalogue (vLLora's models API): capabilities, context windows, prices and features per model.

Hosted models come from launcher/data/hosted_models.json (public list prices, with the date they were
taken), overlaid by what `llm sync --models` last read from the configured upstreams ($LLM_HOME/catalog.json).
Light on purpose: `llm list` reads it, and must not import torch."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kernels.user_dir import llm_home

SHIPPED = Path(__file__).with_name("data") / "hosted_models.json"
# Providers that run what they serve on the user's own hardware: their models cost nothing per token.
SELF_HOSTED = ("llm", "vllm", "nim", "trt_llm", "custom")


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    id: str
    provider: str
    capabilities: tuple[str, ...] = ()
    context_window: int | None = None
    pricing: tuple[float | None, float | None] = (None, None)   # USD per 1M (input, output); None: unknown
    features: tuple[str, ...] = ()
    status: str = "catalog"          # loaded | loading | unloaded (local), available (upstream), catalog

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "provider": self.provider, "capabilities": list(self.capabilities),
                "context_window": self.context_window,
                "pricing": {"input": self.pricing[0], "output": self.pricing[1]},
                "features": list(self.features), "status": self.status}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "CatalogEntry":
        pricing = raw.get("pricing") or {}
        return cls(str(raw["id"]), str(raw["provider"]), tuple(raw.get("capabilities") or ()),
                   raw.get("context_window"), (pricing.get("input"), pricing.get("output")),
                   tuple(raw.get("features") or ()), raw.get("status", "catalog"))


def user_catalog_path() -> Path:
    return llm_home() / "catalog.json"


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def shipped_taken() -> str:
    """When the shipped prices were taken (YYYY-MM-DD)."""
    return _read(SHIPPED).get("taken", "")


def known_entries() -> list[CatalogEntry]:
    """The shipped entries, each overlaid by the last sync's entry for the same (provider, id), then the
    models the sync found that the shipped file does not know."""
    synced = {(e.provider, e.id): e for e in _entries(_read(user_catalog_path()))}
    merged = []
    for entry in _entries(_read(SHIPPED)):
        newer = synced.pop((entry.provider, entry.id), None)
        merged.append(entry if newer is None else merge(entry, newer))
    return merged + list(synced.values())


def _entries(data: dict[str, Any]) -> list[CatalogEntry]:
    out = []
    for raw in data.get("models", []):
        try:
            out.append(CatalogEntry.from_json(raw))
        except (KeyError, TypeError, ValueError):
            continue   # a hand-edited file with a broken entry loses that entry, not the catalogue
    return out


def merge(known: CatalogEntry, reported: CatalogEntry) -> CatalogEntry:
    """What an upstream reports (its context window, capabilities, status) over the catalogue's facts;
    prices and features only the catalogue knows."""
    return CatalogEntry(reported.id, reported.provider, reported.capabilities or known.capabilities,
                        reported.context_window or known.context_window,
                        tuple(r if r is not None else k for r, k in zip(reported.pricing, known.pricing)),
                        reported.features or known.features, reported.status)


def facts(model_id: str, engine: str, entries: list[CatalogEntry] | None = None) -> CatalogEntry | None:
    """The catalogue's entry for a hosted model id: the same provider's first, else any provider's (Azure
    serves OpenAI's models under their ids)."""
    entries = known_entries() if entries is None else entries
    same = {"azure": ("azure", "openai")}.get(engine, (engine,))
    matches = [e for e in entries if e.id == model_id]
    return next((e for e in matches if e.provider in same), matches[0] if matches else None)


def upstream_entry(served_id: str, upstream_id: str, provider: str, engine: str,
                   reported_capabilities: tuple[str, ...] = (), reported_context: int | None = None,
                   entries: list[CatalogEntry] | None = None) -> CatalogEntry:
    """An upstream model's row: what the upstream reports over what the catalogue knows of the model (prices,
    features); a model the catalogue does not know is free on self-hosted engines, of unknown price elsewhere."""
    reported = CatalogEntry(served_id, provider, reported_capabilities, reported_context, status="available")
    known = facts(upstream_id, engine, entries)
    if known is not None:
        return merge(known, reported)
    free = 0.0 if engine in SELF_HOSTED else None
    caps = reported.capabilities or (("embedding",) if "embed" in upstream_id else ("chat", "completion"))
    return CatalogEntry(served_id, provider, caps, reported_context, (free, free), (), "available")


def select(entries: list[CatalogEntry], provider: str | None = None,
           capability: str | None = None) -> list[CatalogEntry]:
    return [e for e in entries if provider in (None, e.provider) and capability in (None, *e.capabilities)]


def write_user_catalog(entries: list[CatalogEntry], synced_at: str) -> Path:
    path = user_catalog_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"synced_at": synced_at, "models": [e.to_json() for e in entries]}, indent=1),
                   encoding="utf-8")
    tmp.replace(path)
    return path


def changes(before: list[CatalogEntry], after: list[CatalogEntry]) -> list[str]:
    """What a sync changed, one line each: + added, - removed, ~ changed (which fields)."""
    old = {(e.provider, e.id): e for e in before}
    new = {(e.provider, e.id): e for e in after}
    lines = [f"+ {p}/{i}" for (p, i) in new.keys() - old.keys()]
    lines += [f"- {p}/{i}" for (p, i) in old.keys() - new.keys()]
    for k in new.keys() & old.keys():
        diffs = [f"{name} {getattr(old[k], name)!r} -> {getattr(new[k], name)!r}"
                 for name in ("capabilities", "context_window") if getattr(old[k], name) != getattr(new[k], name)]
        if diffs:
            lines.append(f"~ {k[0]}/{k[1]}: " + ", ".join(diffs))
    return sorted(lines, key=lambda line: line[2:])
