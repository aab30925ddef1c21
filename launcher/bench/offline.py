"""`llm bench throughput` and `llm bench latency`: offline runs through the engine (imported lazily)."""
from __future__ import annotations

import random
import sys
import time
from typing import Any

from launcher.bench import BenchError
from launcher.bench.metrics import latency_summary, offline_throughput
from launcher.profile import Profile, engine_kwargs


def _open_engine(profile: Profile) -> Any:
    """The offline engine for a profile. NOTE: the one place this module touches the engine (and torch)."""
    from engine.llm import LLM
    kwargs = {k: v for k, v in engine_kwargs(profile).items() if k != "served_name"}  # LLM names it itself
    try:
        return LLM(profile.model.source, revision=profile.model.revision, offline=profile.model.offline,
                   **kwargs)
    except RuntimeError as exc:  # the engine's startup failures (memory, config) are user-facing
        raise BenchError(f"the engine failed to start: {exc}") from None


def _random_prompt_ids(rng: random.Random, num_prompts: int, input_len: int, vocab_size: int) -> list[list[int]]:
    """Prompts as random token ids of exactly input_len (ids past the first 1000 avoid most special tokens)."""
    low = min(1000, vocab_size // 2)
    return [[rng.randrange(low, vocab_size) for _ in range(input_len)] for _ in range(num_prompts)]


def _vocab_size(llm: Any) -> int:
    tokenizer = llm.tokenizer
    for attr in ("vocab_size", "get_vocab_size"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value() if callable(value) else value)
    raise BenchError("cannot tell the tokenizer's vocabulary size")


def run_throughput(profile: Profile, num_prompts: int = 100, input_len: int = 256, output_len: int = 128,
                   seed: int = 0) -> dict[str, Any]:
    """All prompts submitted at once; generation ignores EOS so every request makes output_len tokens."""
    from engine.sampling_params import SamplingParams
    with _open_engine(profile) as llm:
        prompts = _random_prompt_ids(random.Random(seed), num_prompts, input_len, _vocab_size(llm))
        params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
        llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))  # warm-up
        start = time.perf_counter()
        outputs = llm.generate(prompts, params)
        elapsed = time.perf_counter() - start
    num_output = sum(len(c.token_ids) for out in outputs for c in out.outputs)
    result = offline_throughput(num_prompts, num_prompts * input_len, num_output, elapsed)
    result |= {"model": profile.model.source, "input_len": input_len, "output_len": output_len}
    print(f"Throughput: {result['requests_per_second']:.2f} requests/s, "
          f"{result['tokens_per_second']:.2f} total tokens/s, "
          f"{result['output_tokens_per_second']:.2f} output tokens/s", file=sys.stderr)
    return result


def run_latency(profile: Profile, batch_size: int = 8, input_len: int = 32, output_len: int = 128,
                num_iters: int = 10, num_iters_warmup: int = 2, seed: int = 0) -> dict[str, Any]:
    """Time one batch of batch_size requests from submit to the last token, num_iters times."""
    from engine.sampling_params import SamplingParams
    with _open_engine(profile) as llm:
        prompts = _random_prompt_ids(random.Random(seed), batch_size, input_len, _vocab_size(llm))
        params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
        for _ in range(num_iters_warmup):
            llm.generate(prompts, params)
        latencies = []
        for _ in range(num_iters):
            start = time.perf_counter()
            llm.generate(prompts, params)
            latencies.append(time.perf_counter() - start)
    result = latency_summary(latencies)
    result |= {"model": profile.model.source, "batch_size": batch_size, "input_len": input_len,
               "output_len": output_len}
    print(f"Avg latency: {result['avg_latency']:.4f} s; " + ", ".join(
        f"p{p}: {v:.4f} s" for p, v in result["percentiles"].items()), file=sys.stderr)
    return result
