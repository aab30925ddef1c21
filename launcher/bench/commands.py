"""The `llm bench` Click commands; each imports its runner only when invoked (no torch for --help)."""
from __future__ import annotations

import json
import os

import click


def _rate(value: str) -> float:
    try:
        rate = float(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a number or 'inf'") from None
    if not rate > 0:
        raise click.BadParameter("must be positive (or inf)")
    return rate


def _slos(pairs: tuple[str, ...]) -> dict[str, float]:
    slos = {}
    for pair in pairs:
        key, _, value = pair.partition(":")
        try:
            slos[key.strip().lower()] = float(value)
        except ValueError:
            raise click.BadParameter(f"{pair!r}: expected KEY:MS such as ttft:500", param_hint="--goodput")
    return slos


def _fail(exc: Exception) -> None:
    raise click.ClickException(str(exc))


@click.group("bench")
def bench() -> None:
    """Benchmark a running server (serve) or the engine offline (throughput, latency)."""


@bench.command("serve")
@click.option("--url", default="http://127.0.0.1:8000", show_default=True,
              help="Root URL of any OpenAI-compatible server (a trailing /v1 is fine).")
@click.option("--model", default=None, help="Model name to request (default: the first in /v1/models).")
@click.option("--endpoint", type=click.Choice(["completions", "chat"]), default="completions",
              show_default=True, help="/v1/completions or /v1/chat/completions.")
@click.option("--dataset", type=click.Choice(["random", "fixed"]), default="random", show_default=True,
              help="random: a different random-word prompt per request; fixed: one prompt for all.")
@click.option("--num-prompts", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--input-len", type=click.IntRange(min=1), default=256, show_default=True,
              help="Prompt tokens (counted by the server's /tokenize, else approximated by words).")
@click.option("--output-len", type=click.IntRange(min=1), default=128, show_default=True,
              help="max_tokens of each request.")
@click.option("--range-ratio", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True,
              help="Spread lengths uniformly over [len*(1-r), len*(1+r)] (random dataset).")
@click.option("--request-rate", default="inf", show_default=True,
              help="Requests per second with Poisson arrivals, or inf to send all at once.")
@click.option("--burstiness", type=float, default=1.0, show_default=True,
              help="Gamma shape of arrival gaps: 1 is Poisson, <1 burstier, >1 more even.")
@click.option("--max-concurrency", type=click.IntRange(min=1), default=None,
              help="Most requests in flight at once (default: unlimited).")
@click.option("--ignore-eos", is_flag=True, help="Ask the server to generate exactly --output-len tokens.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--api-key", default=None, help="Bearer key (default: $OPENAI_API_KEY).")
@click.option("--percentiles", default="99", show_default=True, help="Comma-separated, e.g. 50,90,99.")
@click.option("--goodput", multiple=True, metavar="KEY:MS",
              help="SLO for goodput, e.g. --goodput ttft:500 --goodput tpot:50 (keys ttft, tpot, e2el).")
@click.option("--extra-body", default=None, metavar="JSON", help="JSON merged into every request body.")
@click.option("--tokenizer", type=click.Choice(["auto", "server", "words"]), default="auto", show_default=True,
              help="How prompt lengths are counted: the server's /tokenize, or words.")
@click.option("--result-json", type=click.Path(dir_okay=False), default=None, help="Write all results here.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="Write a PNG of the latency distributions (needs matplotlib).")
@click.option("--ready-timeout", type=float, default=600.0, show_default=True,
              help="Seconds to wait for a server that answers 503 while it starts.")
@click.option("--quiet", is_flag=True, help="No progress bar and no table (use with --result-json).")
def bench_serve(url, model, endpoint, dataset, num_prompts, input_len, output_len, range_ratio, request_rate,
                burstiness, max_concurrency, ignore_eos, seed, api_key, percentiles, goodput, extra_body,
                tokenizer, result_json, plot, ready_timeout, quiet) -> None:
    """Load a running server with streamed requests; report throughput and TTFT/TPOT/ITL/E2EL as
    `vllm bench serve` defines them."""
    from launcher.bench import BenchError
    from launcher.bench.serve import ServeBenchConfig, main
    try:
        pcts = tuple(float(p) for p in percentiles.split(",") if p.strip())
        body = json.loads(extra_body) if extra_body else {}
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    config = ServeBenchConfig(
        url=url, model=model, endpoint=endpoint, dataset=dataset, num_prompts=num_prompts, input_len=input_len,
        output_len=output_len, range_ratio=range_ratio, request_rate=_rate(request_rate), burstiness=burstiness,
        max_concurrency=max_concurrency, ignore_eos=ignore_eos, seed=seed,
        api_key=api_key or os.environ.get("OPENAI_API_KEY"), percentiles=pcts, slos_ms=_slos(goodput),
        extra_body=body, tokenizer=tokenizer, result_json=result_json, plot=plot, progress=not quiet,
        ready_timeout_s=ready_timeout)
    try:
        main(config)
    except BenchError as exc:
        _fail(exc)


def _profile(profile: str | None, device: str | None):
    from launcher.model_catalog import find_profile
    from launcher.profile import ProfileError, apply_overrides, default_profile, load_profile
    try:
        base = load_profile(find_profile(profile)) if profile else default_profile()
        return apply_overrides(base, device=device)
    except ProfileError as exc:
        _fail(exc)


@bench.command("throughput")
@click.option("--profile", default=None, help="Profile name or path (default: the built-in default).")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default=None)
@click.option("--num-prompts", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--input-len", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--output-len", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--result-json", type=click.Path(dir_okay=False), default=None)
def bench_throughput(profile, device, num_prompts, input_len, output_len, seed, result_json) -> None:
    """Offline throughput: every prompt submitted to the engine at once (no HTTP)."""
    from launcher.bench import BenchError
    from launcher.bench.offline import run_throughput
    try:
        result = run_throughput(_profile(profile, device), num_prompts, input_len, output_len, seed)
    except BenchError as exc:
        _fail(exc)
    _emit(result, result_json)


@bench.command("latency")
@click.option("--profile", default=None, help="Profile name or path (default: the built-in default).")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default=None)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--input-len", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--output-len", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--num-iters", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--num-iters-warmup", type=click.IntRange(min=0), default=2, show_default=True)
@click.option("--result-json", type=click.Path(dir_okay=False), default=None)
def bench_latency(profile, device, batch_size, input_len, output_len, num_iters, num_iters_warmup,
                  result_json) -> None:
    """Latency of one batch, from submit to its last token, over several iterations."""
    from launcher.bench import BenchError
    from launcher.bench.offline import run_latency
    try:
        result = run_latency(_profile(profile, device), batch_size, input_len, output_len, num_iters,
                             num_iters_warmup)
    except BenchError as exc:
        _fail(exc)
    _emit(result, result_json)


def _emit(result: dict, path: str | None) -> None:
    text = json.dumps(result, indent=2)
    if path:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        click.echo(text)
