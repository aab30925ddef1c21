"""Benchmark workloads: prompts of a given token length, and request arrival times."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Protocol, Sequence

from launcher.bench import BenchError

# Common English words, each a single token in typical BPE vocabularies (with its leading space), so that
# the word-count approximation used without a server tokenizer stays close to the true token count.
WORDS = tuple("""the of and to in is was for on are with as at be by this had not but from or have an they
which one you were her all she there would their we him been has when who will more no if out so said what up
its about into than them can only other new some could time these two may then do first any my now such like
our over man me even most made after also did many before must through back years where much your way well
down should because each just those people how too little state good very make world still own see men work
long get here between both life being under never day same another know while last might us great old year
off come since against go came right used take three states himself few house use during without again place
around however home small found thought went say part once general high upon school every""".split())


class Tokenizer(Protocol):
    """Anything that splits text into tokens and joins them back (the server's, or a word approximation)."""
    def encode(self, text: str) -> list: ...
    def decode(self, tokens: Sequence) -> str: ...


class WordTokenizer:
    """Approximates tokens by whitespace-separated words (used when the server has no /tokenize)."""
    def encode(self, text: str) -> list:
        return text.split()

    def decode(self, tokens: Sequence) -> str:
        return " ".join(tokens)


@dataclass(frozen=True, slots=True)
class SampleRequest:
    prompt: str
    prompt_len: int      # tokens in the prompt, as the tokenizer counts them (no chat template, no BOS)
    output_len: int      # max_tokens asked for


def prompt_of_length(tokenizer: Tokenizer, num_tokens: int, rng: random.Random) -> tuple[str, int]:
    """Random words cut to `num_tokens` tokens; returns (text, its re-encoded length), which can differ
    by a token or two where a cut merges differently on re-encoding."""
    words: list[str] = []
    tokens: list = []
    while len(tokens) < num_tokens:
        previous = len(tokens)
        words += rng.choices(WORDS, k=max(8, num_tokens - len(tokens)))
        tokens = tokenizer.encode(" ".join(words))
        if len(tokens) <= previous:  # NOTE: a truncating tokenizer would otherwise loop forever
            raise BenchError(f"the tokenizer returns at most {len(tokens)} tokens; cannot build a "
                             f"{num_tokens}-token prompt")
    text = tokenizer.decode(tokens[:num_tokens])
    return text, len(tokenizer.encode(text))


def sample_lengths(mean: int, range_ratio: float, count: int, rng: random.Random) -> list[int]:
    """Lengths uniform in [mean * (1 - r), mean * (1 + r)] (vLLM's random dataset), at least 1."""
    assert 0.0 <= range_ratio < 1.0, "range_ratio is in [0, 1)"
    low, high = max(1, int(mean * (1 - range_ratio))), max(1, int(mean * (1 + range_ratio)))
    return [rng.randint(low, high) for _ in range(count)]


def build_requests(kind: str, num_prompts: int, input_len: int, output_len: int, tokenizer: Tokenizer,
                   seed: int = 0, range_ratio: float = 0.0) -> list[SampleRequest]:
    """`random`: a different random prompt per request (lengths spread by range_ratio); `fixed`: one prompt
    of exactly input_len tokens sent by every request (exercises the prefix cache)."""
    rng = random.Random(seed)
    if kind == "fixed":
        text, length = prompt_of_length(tokenizer, input_len, rng)
        return [SampleRequest(text, length, output_len) for _ in range(num_prompts)]
    if kind != "random":
        raise ValueError(f"unknown dataset {kind!r}; choose random or fixed")
    in_lens = sample_lengths(input_len, range_ratio, num_prompts, rng)
    out_lens = sample_lengths(output_len, range_ratio, num_prompts, rng)
    requests = []
    for n_in, n_out in zip(in_lens, out_lens):
        text, length = prompt_of_length(tokenizer, n_in, rng)
        requests.append(SampleRequest(text, length, n_out))
    return requests


def arrival_times(num_requests: int, request_rate: float, rng: random.Random,
                  burstiness: float = 1.0) -> list[float]:
    """Send offsets in seconds from the start. rate inf: all at 0. Otherwise gaps are Gamma(burstiness,
    1 / (rate * burstiness)) — exponential, i.e. Poisson arrivals, at burstiness 1 — rescaled so the last
    request goes out at num_requests / rate, as vLLM does to make runs with different seeds comparable."""
    assert request_rate > 0 and burstiness > 0
    if request_rate == float("inf"):
        return [0.0] * num_requests
    times, t = [], 0.0
    for _ in range(num_requests):
        t += rng.gammavariate(burstiness, 1.0 / (request_rate * burstiness))
        times.append(t)
    scale = (num_requests / request_rate) / times[-1] if times and times[-1] > 0 else 1.0
    return [x * scale for x in times]
