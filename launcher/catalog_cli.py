"""`llm sync --models` and the catalogue's rows in `llm list`: no torch, and a server only when asked."""
from __future__ import annotations

import asyncio
import json
import sys
import urllib.error
import urllib.request
from datetime import datetime, timezone

import click

from launcher.catalog import CatalogEntry, changes, known_entries, upstream_entry, user_catalog_path, write_user_catalog
from launcher.tables import text_table


def _price(value: float | None) -> str:
    return "?" if value is None else f"{value:g}"


def print_catalog(entries: list[CatalogEntry], title: str, status: bool = False) -> None:
    click.echo(f"\n{title}")
    headers = ["ID", "PROVIDER", "CAPABILITIES", "CONTEXT", "PRICE IN/OUT", "FEATURES"] + (["STATUS"] if status else [])
    rows = [[e.id, e.provider, ",".join(e.capabilities) or "-", str(e.context_window or "-"),
             f"{_price(e.pricing[0])}/{_price(e.pricing[1])}", ",".join(e.features) or "-"]
            + ([e.status] if status else []) for e in entries]
    click.echo(text_table(headers, rows) if rows else "  (none)")


def _get_json(url: str, headers: dict[str, str], timeout: float) -> dict:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as response:
        return json.loads(response.read())


def server_catalog(url: str, api_key: str | None, capability: str | None, timeout: float = 10.0) -> list[dict]:
    """A running server's models: each GET /v1/models card (id, root, max_model_len, ...) with the catalogue's
    fields (provider, capabilities, context_window, pricing, features, status) from GET /api/models merged in;
    a server without /api/models (vLLM, llama.cpp) gives its cards with what they say."""
    base = url.rstrip("/").removesuffix("/v1")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    cards = _get_json(f"{base}/v1/models", headers, timeout).get("data", [])
    try:
        catalogued = {m["id"]: m for m in _get_json(f"{base}/api/models", headers, timeout)["models"]}
    except urllib.error.HTTPError as e:
        if e.code != 404:
            raise OSError(f"GET {base}/api/models answered {e.code}") from None
        catalogued = {}
    rows = []
    for card in cards:
        entry = catalogued.get(card["id"]) or CatalogEntry(
            card["id"], card.get("owned_by") or "-", tuple(card.get("capabilities") or ()),
            card.get("context_window") or card.get("max_model_len"), status=card.get("status", "-")).to_json()
        if capability is None or capability in (entry["capabilities"] or [capability]):
            rows.append({**card, **entry})
    return rows


@click.command()
@click.option("--models", "models_flag", is_flag=True, help="Refresh the model catalogue (the only thing to sync).")
@click.argument("profile", required=False)
def sync(models_flag: bool, profile: str | None) -> None:
    """Refresh the model catalogue in $LLM_HOME from the upstreams PROFILE configures ([[upstreams]], and
    MAIN_MODEL_ENGINE's in the environment), and print what changed."""
    from launcher.launch import gateway_upstream, upstream_settings
    from launcher.model_catalog import find_profile
    from launcher.profile import ProfileError, default_profile, load_profile
    if not models_flag:
        raise click.UsageError("say what to sync: --models")
    try:
        loaded = load_profile(find_profile(profile)) if profile else default_profile()
    except ProfileError as exc:
        raise click.ClickException(str(exc)) from None
    upstreams = [upstream_settings(u) for u in loaded.upstreams]
    gateway = gateway_upstream()
    if gateway is not None:
        upstreams.append(gateway)
    if not upstreams:
        raise click.ClickException("no upstreams to sync from: add [[upstreams]] to the profile, or set "
                                   "MAIN_MODEL_ENGINE (and MAIN_MODEL_BASE_URL)")
    before = known_entries()
    found, failed = asyncio.run(_listings(upstreams))
    kept = [e for e in before if e.provider in failed and e.status != "catalog"]   # an unreachable one keeps its rows
    synced = [*found, *kept]
    path = write_user_catalog(synced, datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    for name, error in failed.items():
        click.echo(f"! {name}: {error} (its entries are kept)", err=True)
    lines = changes(before, known_entries())
    click.echo("\n".join(lines) if lines else "no changes")
    click.echo(f"{len(synced)} models from {len(upstreams) - len(failed)} of {len(upstreams)} upstreams -> {path}")
    if failed and len(failed) == len(upstreams):
        sys.exit(1)


async def _listings(upstreams) -> tuple[list[CatalogEntry], dict[str, str]]:
    from launcher.server.errors import APIError
    from launcher.server.upstream import Upstream
    found: list[CatalogEntry] = []
    failed: dict[str, str] = {}
    for settings in upstreams:
        upstream = Upstream(settings)
        try:
            for m in await upstream.models():
                listed = m.listed
                found.append(upstream_entry(m.id, m.upstream_id, upstream.name, upstream.provider.engine,
                                            listed.capabilities if listed else (),
                                            listed.context_window if listed else None))
        except APIError as e:
            failed[upstream.name] = e.message
        finally:
            await upstream.close()
    return found, failed


__all__ = ["print_catalog", "server_catalog", "sync", "user_catalog_path"]
