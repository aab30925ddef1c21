"""The default model with int8-quantized activations (EngineConfig.cpu_quantized_activations) against the
exact path (float32 activations, same packed weights): perplexity on a shipped text, greedy agreement."""
import math
import time
from pathlib import Path

import pytest

from engine.config import EngineConfig
from engine.core import EngineCore
from engine.loader import ModelFiles, load_tokenizer
from engine.messages import AddRequest
from engine.sampling_params import SamplingParams
from kernels.cpu_build import load_library
from tests.engine.helpers import run_to_completion
from tests.engine.test_default_model_parity import CHAT_QUESTIONS, NEW_TOKENS, RAW_PROMPTS

pytestmark = pytest.mark.skipif(load_library() is None, reason="the CPU kernels are not built here")

TEXT = Path(__file__).resolve().parents[1] / "fixtures" / "perplexity.txt"


def engine(path: str, quantized_activations: bool) -> EngineCore:
    # packed weights only: prompt chunks over 64 tokens run the quantized kernel too (not float32 sgemm)
    return EngineCore(EngineConfig(model=path, kv_cache_gib=0.5, max_model_len=2048, cpu_float_copies=False,
                                   cpu_quantized_activations=quantized_activations))


@pytest.fixture(scope="module")
def cores(default_gguf_path) -> dict[bool, EngineCore]:
    return {qa: engine(default_gguf_path, qa) for qa in (False, True)}


@pytest.fixture(scope="module")
def tokenizer(default_gguf_path):
    return load_tokenizer(ModelFiles.at(default_gguf_path))


def test_the_flag_repacks_every_packed_weight(cores) -> None:
    for qa, core in cores.items():
        packed = [m.packed for m in core.model.modules() if getattr(m, "packed", None) is not None]
        assert len(packed) == 4 * len(core.model.layers) + 1   # q/k/v, o, gate/up, down a layer; the tied head
        assert {p.activations for p in packed} == {"int8" if qa else "float32"}
        if qa:   # Q4_1 / Q8_0 carry float16 scales: kept as such
            assert all(p.scale.dtype.itemsize == 2 for p in packed)


def test_the_int8_path_keeps_a_float16_cache_of_twice_the_tokens(cores, default_gguf_path) -> None:
    """kv_cache_dtype auto: float16 K/V beside int8 activations (llama.cpp's numerics), float32 on the exact
    path; the same kv_cache_gib then holds twice the tokens. Named explicitly, either path takes either."""
    import torch
    from engine.startup import StartupError, pick_kv_dtype
    assert cores[True].runner.kv_caches[0][0].dtype == torch.float16
    assert cores[False].runner.kv_caches[0][0].dtype == torch.float32
    assert cores[True].info.num_blocks == 2 * cores[False].info.num_blocks
    exact_f16 = EngineCore(EngineConfig(model=default_gguf_path, kv_cache_gib=0.05, max_model_len=512,
                                        cpu_quantized_activations=False, kv_cache_dtype="float16"))
    assert exact_f16.runner.kv_caches[0][0].dtype == torch.float16
    out = run_to_completion(exact_f16, [[504, 3575, 282, 2025, 288]], SamplingParams(temperature=0, max_tokens=8))
    assert len(out["r0"]) == 8
    # a dtype the C attention does not read: the torch twins serve it (decode steps without the fused stack)
    bf16 = EngineCore(EngineConfig(model=default_gguf_path, kv_cache_gib=0.05, max_model_len=512,
                                   kv_cache_dtype="bfloat16"))
    assert bf16.runner.kv_caches[0][0].dtype == torch.bfloat16
    out = run_to_completion(bf16, [[504, 3575, 282, 2025, 288]], SamplingParams(temperature=0, max_tokens=8))
    assert len(out["r0"]) == 8
    with pytest.raises(StartupError, match="the cache holds the model dtype"):
        pick_kv_dtype("float16", torch.bfloat16, torch.device("cuda"), cores[True].model)


def perplexity(core: EngineCore, ids: list[int]) -> float:
    core.add_request(AddRequest("ppl", ids, SamplingParams(max_tokens=1, prompt_logprobs=0), time.monotonic()))
    got = None
    while core.has_work():
        for out in core.step():
            got = out.prompt_logprobs if out.prompt_logprobs is not None else got
    assert got is not None and len(got) == len(ids) and got[0].logprob is None
    return math.exp(-sum(e.logprob for e in got[1:]) / (len(ids) - 1))


def test_perplexity_within_one_percent_of_the_exact_path(cores, tokenizer) -> None:
    """Measured over the 470 tokens of tests/fixtures/perplexity.txt: 23.170 exact, 23.342 int8 with its float16
    cache (+0.74%; 23.392 with a float32 one). Float-level changes elsewhere (the order of the attention sums)
    move the int8 figure by ~0.5% (+0.42% before prefill attention ran the decode kernel): this short text
    measures int8 noise to about that."""
    ids = tokenizer.encode(TEXT.read_text())
    assert len(ids) > 300
    exact, quantized = perplexity(cores[False], ids), perplexity(cores[True], ids)
    print(f"perplexity: exact {exact:.3f}, int8 {quantized:.3f} ({quantized / exact - 1:+.2%})")
    assert 5 < exact < 60, exact   # a sane model on plain English
    assert abs(quantized / exact - 1) < 0.01, (exact, quantized)


def parity_prompts(tokenizer) -> list[list[int]]:
    prompts = [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": q}]),
                                add_special_tokens=False) for q in CHAT_QUESTIONS]
    return prompts + [tokenizer.encode(p) for p in RAW_PROMPTS]


def top_tokens(core: EngineCore, ids: list[int]) -> list[int]:
    """The path's most likely next token at every position of ids (teacher forced: the same context for
    every path), from prompt_logprobs' top entry; entry j predicts token j."""
    core.add_request(AddRequest("tf", ids, SamplingParams(max_tokens=1, prompt_logprobs=1), time.monotonic()))
    got = None
    while core.has_work():
        for out in core.step():
            got = out.prompt_logprobs if out.prompt_logprobs is not None else got
    assert got is not None and len(got) == len(ids)
    return [e.top[0][0] for e in got[1:]]


@pytest.fixture(scope="module")
def exact_continuations(cores, tokenizer) -> list[tuple[list[int], list[int]]]:
    prompts = parity_prompts(tokenizer)
    outputs = run_to_completion(cores[False], prompts, SamplingParams(temperature=0, max_tokens=NEW_TOKENS))
    return [(prompt, outputs[f"r{i}"]) for i, prompt in enumerate(prompts)]


def test_same_top_token_as_the_exact_path(cores, exact_continuations) -> None:
    """The field's measure of a quantized path (llama.cpp's `perplexity --kl-divergence` "same top p"): on
    the exact path's greedy continuations of the 22 parity prompts, fed to both paths as context, how often
    the int8 path's most likely next token is the exact path's. Measured: 97.7% (1195 of 1223 tokens)."""
    same = total = 0
    for prompt, continuation in exact_continuations:
        ids = prompt + continuation
        exact, quantized = top_tokens(cores[False], ids), top_tokens(cores[True], ids)
        assert exact[len(prompt) - 1:] == continuation   # the exact path's own greedy choices, prefilled
        window = slice(len(prompt) - 1, len(ids) - 1)
        same += sum(a == b for a, b in zip(exact[window], quantized[window]))
        total += len(continuation)
    print(f"same top token as the exact path: {same / total:.1%} ({same} of {total})")
    assert same / total >= 0.95, (same, total)


def test_free_running_greedy_agreement(cores, tokenizer, exact_continuations) -> None:
    """Int8 rows move a projection's output ~0.6-0.9% (relative), enough to flip this 135M model's near-tied
    greedy choices, and once one differs the two paths continue different texts: measured 33-53% of the tokens
    before each prompt's first difference over the 22 parity prompts (64 tokens at most), the first token the
    same on 18-19 of them. Not a quality measure (test_same_top_token_as_the_exact_path is); the bounds only
    catch a broken kernel, which would differ from the first token on."""
    prompts = [prompt for prompt, _ in exact_continuations]
    exact = {f"r{i}": continuation for i, (_, continuation) in enumerate(exact_continuations)}
    quantized = run_to_completion(cores[True], prompts, SamplingParams(temperature=0, max_tokens=NEW_TOKENS))
    first_differences = []
    for rid, ref in exact.items():
        ours = quantized[rid]
        first_differences.append(next((i for i, (a, b) in enumerate(zip(ref, ours)) if a != b), len(ref)))
    agreeing_prefix = sum(first_differences) / sum(len(o) for o in exact.values())
    print(f"greedy agreement before the first difference: {agreeing_prefix:.1%}; first differences "
          f"{first_differences}")
    assert sum(d > 0 for d in first_differences) >= 15, first_differences
    assert agreeing_prefix > 0.2, agreeing_prefix
