"""The engine under load on the default model: batch invariance, KV pressure, aborts, prefix cache, seeds."""
import time

import pytest

from engine.config import EngineConfig
from engine.core import EngineCore
from engine.messages import AddRequest
from engine.sampling_params import SamplingParams
from engine.validation import InvalidRequest, check_request
from tests.engine.helpers import collect, run_to_completion

GREEDY = SamplingParams(temperature=0, max_tokens=24)


def make_prompts(count: int, base_len: int = 20) -> list[list[int]]:
    """Varied, deterministic prompts of different lengths (real vocabulary ids)."""
    return [[(1000 + 37 * i + 11 * j) % 40000 + 100 for j in range(base_len + (7 * i) % 45)]
            for i in range(count)]


@pytest.fixture(scope="module")
def core(default_gguf_path):
    return EngineCore(EngineConfig(model=default_gguf_path, kv_cache_gib=0.25, max_model_len=1024,
                                   max_num_batched_tokens=512))


@pytest.fixture(scope="module")
def reference(core):
    """Each of 32 prompts run alone."""
    prompts = make_prompts(32)
    alone = [run_to_completion(core, [p], GREEDY)["r0"] for p in prompts]
    return prompts, alone


def test_batch_invariance(core, reference):
    prompts, alone = reference
    together = run_to_completion(core, prompts, GREEDY)
    assert [together[f"r{i}"] for i in range(len(prompts))] == alone
    assert core.stats().scheduler.num_blocks_used == 0


def test_kv_pressure_preempts_and_still_gives_the_same_tokens(default_gguf_path, reference):
    prompts, alone = reference
    # 40 blocks of 16 tokens (float16 K/V, the int8 default's): far less than 32 sequences of ~70 tokens need.
    small = EngineCore(EngineConfig(model=default_gguf_path, kv_cache_gib=40 * 16 * 30 * 2 * 3 * 64 * 2 / 2**30,
                                    max_model_len=512, max_num_batched_tokens=256))
    assert small.info.num_blocks == 40
    out = run_to_completion(small, prompts, GREEDY)
    assert [out[f"r{i}"] for i in range(len(prompts))] == alone
    stats = small.stats().scheduler
    assert stats.num_preemptions > 0
    assert stats.num_blocks_used == 0 and small.block_manager.num_free_blocks == 40


def test_abort_half_frees_blocks_and_the_rest_complete(core, reference):
    prompts, alone = reference
    params = SamplingParams(temperature=0, max_tokens=24)
    outputs: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        core.add_request(AddRequest(f"a{i}", p, params, time.monotonic()))
    for _ in range(6):  # a few decode steps in
        for out in core.step():
            collect(outputs, out)
    assert core.stats().scheduler.num_blocks_used > 0
    aborted = [f"a{i}" for i in range(0, 32, 2)]
    results = core.abort(aborted)
    assert {o.request_id for o in results} == set(aborted) and all(o.finish_reason == "abort" for o in results)
    while core.has_work():
        for out in core.step():
            collect(outputs, out)
    for i in range(1, 32, 2):
        assert outputs[f"a{i}"] == alone[i]
    assert core.stats().scheduler.num_blocks_used == 0


def test_shared_prefix_is_computed_once(default_gguf_path):
    prefix = make_prompts(1, base_len=200)[0][:200]
    prompts = [prefix + [500, 501, 502], prefix + [900, 901, 902, 903]]
    outputs = {}
    for caching in (True, False):
        core = EngineCore(EngineConfig(model=default_gguf_path, kv_cache_gib=0.05, max_model_len=512,
                                       enable_prefix_caching=caching))
        first = run_to_completion(core, prompts[:1], GREEDY)["r0"]
        before = core.stats().scheduler
        second = run_to_completion(core, prompts[1:], GREEDY)["r0"]
        after = core.stats().scheduler
        outputs[caching] = (first, second)
        hits = after.prefix_cache_hits - before.prefix_cache_hits
        if caching:
            assert hits == 192  # 12 full blocks of the shared 200-token prefix
            assert after.num_prompt_tokens - before.num_prompt_tokens == len(prompts[1]) - 192
        else:
            assert hits == 0
    assert outputs[True] == outputs[False]


def test_seeded_sampling_is_reproducible_whatever_the_batch(core):
    prompt = make_prompts(1)[0]
    seeded = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=16)
    alone = run_to_completion(core, [prompt], seeded)["r0"]
    mates = make_prompts(6)[1:]
    mixed = run_to_completion(core, mates[:3] + [prompt] + mates[3:],
                              [SamplingParams(temperature=1.0, max_tokens=16)] * 3 + [seeded]
                              + [SamplingParams(temperature=0.5, max_tokens=16)] * 2)
    assert mixed["r3"] == alone
    other = run_to_completion(core, [prompt], SamplingParams(temperature=0.9, top_p=0.95, seed=4321,
                                                             max_tokens=16))["r0"]
    assert other != alone


def test_n_and_best_of(core):
    prompt = make_prompts(1)[0]
    core.add_request(AddRequest("n", prompt, SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=8),
                                   time.monotonic()))
    core.add_request(AddRequest("b", prompt, SamplingParams(n=2, best_of=4, temperature=1.0, seed=6,
                                                               max_tokens=8), time.monotonic()))
    samples: dict[tuple[str, int], list[int]] = {}
    finished = set()
    while core.has_work():
        for out in core.step():
            samples.setdefault((out.request_id, out.index), []).extend(out.new_token_ids)
            if out.finished:
                finished.add((out.request_id, out.index))
    assert finished == {("n", 0), ("n", 1), ("n", 2), ("b", 0), ("b", 1)}
    assert len({tuple(samples[("n", i)]) for i in range(3)}) > 1, "samples differ"
    assert all(len(samples[("b", i)]) == 8 for i in range(2))
    assert core.stats().scheduler.num_blocks_used == 0


def test_requests_that_cannot_fit_are_refused_before_they_reach_the_engine(core):
    too_long = list(range(100, 100 + 1020))
    with pytest.raises(InvalidRequest) as err:
        check_request(too_long, 10, core.info)
    assert err.value.code == "context_length_exceeded" and "1024" in str(err.value) and "1020" in str(err.value)
    with pytest.raises(InvalidRequest, match="token ids"):
        check_request([10**7], 1, core.info)
    # The engine asserts what its clients check: a request that slips through never runs.
    with pytest.raises(AssertionError):
        core.add_request(AddRequest("long", too_long, SamplingParams(max_tokens=10), time.monotonic()))
    assert not core.has_work() and "long" not in core.requests


def test_stop_sample_ends_one_sample_and_frees_its_blocks(core):
    """n > 1: the server saw a stop string in sample 1; the engine ends it, the others run to max_tokens."""
    params = SamplingParams(temperature=0.8, seed=7, n=3, max_tokens=40, ignore_eos=True)
    core.add_request(AddRequest("s", make_prompts(1, base_len=40)[0], params, time.monotonic()))
    counts, finishes = [0, 0, 0], {}

    def take(outputs):
        for out in outputs:
            counts[out.index] += len(out.new_token_ids)
            if out.finished:
                finishes[out.index] = out.finish_reason

    for _ in range(5):
        take(core.step())
    used_before = core.stats().scheduler.num_blocks_used
    take(core.stop_sample("s", 1))
    assert finishes == {1: "stop"} and core.stats().scheduler.num_blocks_used < used_before
    assert core.stop_sample("s", 1) == [] and core.stop_sample("unknown", 0) == []
    while core.has_work():
        take(core.step())
    assert finishes == {0: "length", 1: "stop", 2: "length"}
    assert counts[0] == counts[2] == 40 and counts[1] < 10
    assert core.stats().scheduler.num_blocks_used == 0 and "s" not in core.requests


def test_seeded_generators_live_on_the_engine_device(core):
    """Sampling draws with them into tensors on the engine's device (a CPU generator fails on CUDA)."""
    core.add_request(AddRequest("g", make_prompts(1)[0], SamplingParams(n=2, seed=3, max_tokens=2), time.monotonic()))
    generators = [s.generator for s in core.requests["g"].samples]
    assert all(g is not None and g.device.type == core.device.type for g in generators)
    assert generators[0].initial_seed() == 3 and generators[1].initial_seed() == 4
    core.abort(["g"])
    assert core.stats().scheduler.num_blocks_used == 0
