"""Sampler against slow per-row numpy references (and HF's logits processors): penalties, filters, draws."""
from collections import Counter

import numpy as np
import pytest
import torch

import engine.sampler as sampler_module
from engine.sampler import (Sampler, SamplingRow, apply_filters, apply_penalties, compute_prompt_logprobs,
                            make_generator)
from engine.sampling_params import SamplingParams

EOS = frozenset({2, 5})
NUM_DRAWS = 20_000
MARGIN = 1e-5   # reference cut-offs must be at least this far from a boundary, else the test is ill-posed


def small_logits(vocab_size: int = 12, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=vocab_size).astype(np.float32) * 1.2


# ---------- slow references, one row at a time ----------

def ref_penalties(logits, params, prompt, output, eos):
    x = logits.astype(np.float64).copy()
    for token_id, bias in (params.logit_bias or {}).items():
        x[token_id] += bias
    if params.ignore_eos:
        x[list(eos)] = -np.inf
    if len(output) < params.min_tokens:
        x[list(eos) + list(params.stop_token_ids)] = -np.inf
    if params.repetition_penalty != 1.0:
        for t in set(prompt) | set(output):
            x[t] = x[t] / params.repetition_penalty if x[t] > 0 else x[t] * params.repetition_penalty
    for t, count in Counter(output).items():
        x[t] -= count * params.frequency_penalty + params.presence_penalty
    return x


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def ref_distribution(x, params):
    """Probabilities after temperature -> top_k -> top_p -> min_p, renormalised (float64)."""
    probs = softmax(np.asarray(x, np.float64) / params.temperature)
    order = np.argsort(-probs, kind="stable")
    keep = np.ones(len(probs), bool)
    if 0 < params.top_k < len(probs):
        keep[order[params.top_k:]] = False
    if params.top_p < 1.0:
        kept = np.where(keep, probs, 0.0)
        kept /= kept.sum()
        preceding = np.cumsum(kept[order]) - kept[order]
        assert np.abs(preceding - params.top_p).min() > MARGIN
        keep[order[preceding >= params.top_p]] = False
    if params.min_p > 0.0:
        ratio = probs / probs.max()
        assert np.abs(ratio - params.min_p).min() > MARGIN
        keep &= ratio >= params.min_p
    out = np.where(keep, probs, 0.0)
    return out / out.sum()


def log_softmax(x):
    x = np.asarray(x, np.float64)
    return x - x.max() - np.log(np.exp(x - x.max()).sum())


# ---------- helpers ----------

def draw(params, logits_row, prompt=(), output=(), num=NUM_DRAWS, seed=0):
    """num independent draws: one call over num identical unseeded rows."""
    logits = torch.from_numpy(np.tile(logits_row, (num, 1)))
    rows = [SamplingRow(params, list(prompt), list(output))] * num
    return np.array(Sampler(seed=seed)(logits, rows, EOS).token_ids)


def assert_distribution(tokens, probs):
    n = len(tokens)
    counts = np.bincount(tokens, minlength=len(probs))
    support = probs > 0
    assert counts[~support].sum() == 0, f"sampled outside the allowed set: {np.flatnonzero(counts * ~support)}"
    assert (counts[probs * n >= 20] > 0).all(), "a likely allowed token was never sampled"
    sigma = np.sqrt(probs * (1 - probs) / n)
    assert np.all(np.abs(counts / n - probs) <= 5 * sigma + 1e-12), (counts / n, probs)
    binned = probs * n >= 5   # the usual chi-square validity rule
    expected = n * probs[binned]
    chi2 = ((counts[binned] - expected) ** 2 / expected).sum()
    df = max(binned.sum() - 1, 1)
    assert chi2 < df + 6 * np.sqrt(2 * df) + 1, (chi2, df)


@pytest.fixture(params=["candidates", "vocabulary"])
def sampling_path(request, monkeypatch):
    """Run a test through both the top-k candidate path and the whole-vocabulary path (forced)."""
    if request.param == "vocabulary":
        monkeypatch.setattr(sampler_module, "TOPK_CANDIDATE_LIMIT", 0)
    return request.param


# ---------- penalties: processed logits equal the reference ----------

PENALTY_CASES = {
    "logit_bias": SamplingParams(logit_bias={0: 3.5, 7: -100.0, 11: 0.25}),
    "repetition_up": SamplingParams(repetition_penalty=1.7),
    "repetition_down": SamplingParams(repetition_penalty=0.6),
    "presence": SamplingParams(presence_penalty=1.5),
    "frequency": SamplingParams(frequency_penalty=-0.7),
    "min_tokens": SamplingParams(min_tokens=5, stop_token_ids=[9, 10]),
    "ignore_eos": SamplingParams(ignore_eos=True, stop_token_ids=[9]),
    "combined": SamplingParams(logit_bias={3: 2.0, 4: -1.0}, repetition_penalty=1.3, presence_penalty=0.4,
                               frequency_penalty=0.9, min_tokens=4, stop_token_ids=[9]),
}


@pytest.mark.parametrize("name", list(PENALTY_CASES))
def test_penalties_match_reference(name):
    params = PENALTY_CASES[name]
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, 12)).astype(np.float32) * 2
    prompt, output = [1, 3, 3, 4, 8], [3, 6, 6, 6, 11]
    rows = [SamplingRow(params, prompt, output),
            SamplingRow(SamplingParams(), prompt, output),          # a mate that uses no penalty
            SamplingRow(params, [0, 9], [4] * 7)]                    # past min_tokens
    before = torch.from_numpy(logits.copy())
    got = apply_penalties(before, rows, EOS)
    assert torch.equal(before, torch.from_numpy(logits)), "input logits were written"
    for i, row in enumerate(rows):
        expected = ref_penalties(logits[i], row.params, row.prompt_token_ids, row.output_token_ids, EOS)
        torch.testing.assert_close(got[i].double(), torch.from_numpy(expected), rtol=1e-6, atol=1e-5)


def test_repetition_penalty_matches_hf():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor
    logits = torch.randn(2, 40, generator=torch.Generator().manual_seed(3)) * 3
    history = [[1, 5, 5, 9, 30], [0, 2, 39, 7, 7]]
    rows = [SamplingRow(SamplingParams(repetition_penalty=1.4), h[:3], h[3:]) for h in history]
    expected = RepetitionPenaltyLogitsProcessor(1.4)(torch.tensor(history), logits.clone())
    torch.testing.assert_close(apply_penalties(logits, rows, EOS), expected)


def test_untouched_logits_are_returned_as_is():
    logits = torch.randn(2, 12)
    rows = [SamplingRow(SamplingParams(temperature=0.7, top_p=0.5, min_tokens=2), [1], [1, 2])] * 2
    assert apply_penalties(logits, rows, EOS) is logits


# ---------- masks: eos/stop ids never sampled while masked ----------

def test_min_tokens_and_ignore_eos_are_never_sampled_while_masked():
    logits = small_logits()
    logits[[2, 5, 9]] = [12.0, 11.0, 10.0]   # eos ids and a stop id dominate the distribution
    masked = SamplingParams(min_tokens=3, stop_token_ids=[9], max_tokens=8)
    for params, output in ((masked, [1, 1]), (SamplingParams(ignore_eos=True), [1] * 50)):
        tokens = draw(params, logits, output=output, num=5000)
        banned = {2, 5} | ({9} if output == [1, 1] else set())
        assert not banned & set(tokens.tolist())
        x = ref_penalties(logits, params, [], output, EOS)
        assert_distribution(tokens, ref_distribution(x, params))
    # once min_tokens is reached the masks lift: eos is the argmax again
    greedy = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[9])
    assert draw(greedy, logits, output=[1, 1], num=2).tolist() == [int(np.argsort(-logits)[3])] * 2
    assert draw(greedy, logits, output=[1, 1, 1], num=2).tolist() == [2, 2]
    # ignore_eos leaves stop ids alone
    assert draw(SamplingParams(temperature=0.0, ignore_eos=True, stop_token_ids=[9]), logits, num=1)[0] == 9


# ---------- filters ----------

FILTER_CASES = {
    "temperature_0.5": SamplingParams(temperature=0.5),
    "temperature_1": SamplingParams(temperature=1.0),
    "temperature_2": SamplingParams(temperature=2.0),
    "top_k": SamplingParams(top_k=3),
    "top_k_temperature": SamplingParams(top_k=5, temperature=0.7),
    "top_p": SamplingParams(top_p=0.6),
    "top_p_temperature": SamplingParams(top_p=0.87, temperature=1.5),
    "min_p": SamplingParams(min_p=0.15),
    "top_k_top_p": SamplingParams(top_k=3, top_p=0.7),   # top_p acts on the renormalised top-k mass
    "top_k_min_p": SamplingParams(top_k=7, min_p=0.2, temperature=1.3),
    "all": SamplingParams(top_k=8, top_p=0.75, min_p=0.08, temperature=0.8),
}


@pytest.mark.parametrize("name", list(FILTER_CASES))
def test_sampled_distribution_matches_reference(name, sampling_path):
    params = FILTER_CASES[name]
    logits = small_logits()
    assert_distribution(draw(params, logits), ref_distribution(logits, params))


@pytest.mark.parametrize("name", list(FILTER_CASES))
def test_filtered_support_matches_reference_and_hf(name):
    from transformers.generation.logits_process import (MinPLogitsWarper, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)
    params = FILTER_CASES[name]
    logits = np.random.default_rng(4).normal(size=(3, 1000)).astype(np.float32) * 2.5
    filtered = apply_filters(torch.from_numpy(logits), [params] * 3)
    hf = torch.from_numpy(logits)
    warpers = [TemperatureLogitsWarper(params.temperature)]
    warpers += [TopKLogitsWarper(params.top_k)] if params.top_k else []
    warpers += [TopPLogitsWarper(params.top_p)] if params.top_p < 1 else []
    warpers += [MinPLogitsWarper(params.min_p)] if params.min_p else []
    for warper in warpers:
        hf = warper(None, hf)
    for i in range(3):
        expected = ref_distribution(logits[i], params)
        assert np.array_equal(torch.isfinite(filtered[i]).numpy(), expected > 0)
        assert np.array_equal(torch.isfinite(hf[i]).numpy(), expected > 0)
        # the kept logits renormalise to the reference probabilities
        np.testing.assert_allclose(filtered[i].softmax(-1).double().numpy(), expected, rtol=1e-4, atol=1e-7)


def test_rows_with_different_filters_share_a_batch(sampling_path):
    """Row parameters are per row: a mate's larger top_k must not leak into another row's top_p."""
    logits, cases = small_logits(), [FILTER_CASES[name] for name in ("top_k_top_p", "all", "top_p", "min_p")]
    rows = [SamplingRow(cases[i % len(cases)], [], []) for i in range(NUM_DRAWS)]
    out = np.array(Sampler(seed=4)(torch.from_numpy(np.tile(logits, (NUM_DRAWS, 1))), rows, EOS).token_ids)
    for j, params in enumerate(cases):
        assert_distribution(out[j::len(cases)], ref_distribution(logits, params))
    # and the whole-vocabulary filters, row by row against the reference
    logits = np.random.default_rng(4).normal(size=(len(FILTER_CASES), 1000)).astype(np.float32) * 2.5
    filtered = apply_filters(torch.from_numpy(logits), list(FILTER_CASES.values()))
    for i, params in enumerate(FILTER_CASES.values()):
        assert np.array_equal(torch.isfinite(filtered[i]).numpy(), ref_distribution(logits[i], params) > 0)


def test_top_k_keeps_k_tokens_under_ties_among_candidates():
    logits = np.zeros(12, np.float32)
    logits[:6] = 1.0   # six tokens tie for first place
    rows = [SamplingRow(SamplingParams(top_k=2 if i % 2 else 8), [], []) for i in range(2000)]
    tokens = Sampler(seed=5)(torch.from_numpy(np.tile(logits, (2000, 1))), rows, EOS).token_ids
    # the top_k=8 mates widen the candidate tensor; the top_k=2 rows still keep two tokens
    assert len(set(tokens[1::2])) == 2 and set(tokens[1::2]) <= set(range(6))


def test_penalties_and_filters_combined(sampling_path):
    params = SamplingParams(temperature=0.9, top_k=9, top_p=0.9, min_p=0.05, repetition_penalty=1.2,
                            presence_penalty=0.3, frequency_penalty=0.2, logit_bias={6: 1.5},
                            min_tokens=10, stop_token_ids=[7])
    logits, prompt, output = small_logits(seed=5), [0, 1, 1, 3], [3, 4, 4, 8, 8, 8]
    x = ref_penalties(logits, params, prompt, output, EOS)
    assert_distribution(draw(params, logits, prompt, output), ref_distribution(x, params))


# ---------- greedy, mixed batches, logprobs ----------

def test_greedy_rows_take_argmax_of_processed_logits_beside_sampled_rows():
    logits = np.random.default_rng(6).normal(size=(9, 64)).astype(np.float32)
    greedy = SamplingParams(temperature=0.0, repetition_penalty=2.0, logit_bias={63: 0.5})
    sampled = SamplingParams(top_p=0.9)
    rows = [SamplingRow(greedy if i % 3 == 0 else sampled, [int(np.argmax(logits[i]))], []) for i in range(9)]
    out = Sampler(seed=1)(torch.from_numpy(logits), rows, EOS)
    for i, row in enumerate(rows):
        x = ref_penalties(logits[i], row.params, row.prompt_token_ids, [], EOS)
        if row.params.is_greedy:
            assert out.token_ids[i] == int(np.argmax(x))
        else:
            assert ref_distribution(x, row.params)[out.token_ids[i]] > 0


def test_mixed_greedy_and_sampled_rows_keep_the_sampled_distribution():
    logits = small_logits(seed=7)
    params = SamplingParams(top_k=6, temperature=1.2)
    rows = [SamplingRow(SamplingParams(temperature=0.0) if i % 2 else params, [], []) for i in range(NUM_DRAWS)]
    out = np.array(Sampler(seed=2)(torch.from_numpy(np.tile(logits, (NUM_DRAWS, 1))), rows, EOS).token_ids)
    assert (out[1::2] == np.argmax(logits)).all()
    assert_distribution(out[0::2], ref_distribution(logits, params))


def test_logprobs_are_raw_log_softmax():
    logits = np.random.default_rng(8).normal(size=(4, 300)).astype(np.float32) * 3
    rows = [SamplingRow(SamplingParams(temperature=0.0, logprobs=5), [], []),
            SamplingRow(SamplingParams(temperature=0.5, top_k=3, logit_bias={7: 50.0}, logprobs=0), [], []),
            SamplingRow(SamplingParams(top_p=0.5, repetition_penalty=1.5, logprobs=20), [1, 2], [3]),
            SamplingRow(SamplingParams(), [], [])]
    out = Sampler(seed=3)(torch.from_numpy(logits), rows, EOS)
    assert out.token_ids[1] == 7   # the bias decides the token, but logprobs stay those of the raw logits
    for i, row in enumerate(rows):
        ref = log_softmax(logits[i])
        assert out.logprobs[i] == pytest.approx(ref[out.token_ids[i]], abs=1e-5)
        k = row.params.logprobs or 0
        top = out.top_logprobs[i]
        assert [t for t, _ in top] == np.argsort(-ref, kind="stable")[:k].tolist()
        np.testing.assert_allclose([lp for _, lp in top], ref[[t for t, _ in top]], atol=1e-5)
    assert Sampler()(torch.from_numpy(logits), [SamplingRow(SamplingParams(), [], [])] * 4, EOS).top_logprobs is None


def test_sampler_puts_the_raw_logits_back_exactly():
    """The sampler writes penalties into the step's logits and restores them: afterwards they are the raw values
    bit for bit, even where stages overlap on one (row, token) pair (bias, repetition, presence and the EOS mask
    all on token 2 here), and the greedy choice is the argmax of apply_penalties' copy."""
    logits = torch.from_numpy(np.random.default_rng(10).normal(size=(3, 40)).astype(np.float32) * 3)
    raw = logits.clone()
    overlap = SamplingParams(temperature=0.0, logit_bias={2: 9.0, 3: 1.0}, repetition_penalty=1.3,
                             presence_penalty=0.5, frequency_penalty=0.25, min_tokens=8, stop_token_ids=[3])
    rows = [SamplingRow(overlap, [2, 3, 7], [2, 2, 9]),
            SamplingRow(SamplingParams(temperature=0.0, ignore_eos=True), [], [1]),
            SamplingRow(SamplingParams(temperature=0.8, top_k=4, repetition_penalty=0.7), [5], [6])]
    out = Sampler(seed=5)(logits, rows, EOS)
    assert torch.equal(logits, raw)
    penalized = apply_penalties(raw, rows, EOS)
    assert out.token_ids[:2] == penalized[:2].argmax(dim=-1).tolist()
    assert out.token_ids[0] not in (2, 3, 5)   # masked until min_tokens, whatever the bias


def test_token_logprobs_only_when_someone_reads_them():
    """No row asks for logprobs and none ranks best_of samples: the sampler skips the logsumexp (NaN logprobs),
    and chooses the same tokens; one best_of row is enough to compute them for all."""
    logits = torch.from_numpy(np.random.default_rng(9).normal(size=(3, 300)).astype(np.float32))
    plain = [SamplingRow(SamplingParams(temperature=0.0), [], []),
             SamplingRow(SamplingParams(temperature=0.7, top_k=5, seed=1), [], [], make_generator(1))]
    out = Sampler(seed=4)(logits[:2], plain, EOS)
    assert all(np.isnan(out.logprobs)) and out.top_logprobs is None
    assert out.token_ids[0] == int(logits[0].argmax())
    ranked = plain[:1] + [SamplingRow(SamplingParams(temperature=0.7, n=1, best_of=2), [], [])]
    out = Sampler(seed=4)(logits[:2], ranked, EOS)
    ref = log_softmax(logits[0].numpy())
    assert out.logprobs[0] == pytest.approx(ref[out.token_ids[0]], abs=1e-5) and not np.isnan(out.logprobs[1])


def test_prompt_logprobs_match_log_softmax():
    chunk = sampler_module._PROMPT_LOGPROBS_CHUNK
    logits = np.random.default_rng(9).normal(size=(chunk + 37, 50)).astype(np.float32) * 2
    targets = np.random.default_rng(10).integers(0, 50, size=len(logits))
    for k in (0, 4):
        result = compute_prompt_logprobs(torch.from_numpy(logits), targets.tolist(), k)
        assert len(result) == len(logits)
        for t, (chosen, top) in enumerate(result):
            ref = log_softmax(logits[t])
            assert chosen == pytest.approx(ref[targets[t]], abs=1e-5)
            assert [i for i, _ in top] == np.argsort(-ref, kind="stable")[:k].tolist()
            np.testing.assert_allclose([lp for _, lp in top], ref[[i for i, _ in top]], atol=1e-5)


# ---------- seeds ----------

SEEDED = {"top_p": SamplingParams(seed=7, top_p=0.95), "top_k": SamplingParams(seed=7, top_k=40, temperature=1.4)}


def run_steps(slots, num_steps=12, vocab_size=1000):
    """slots: (row index -> params) per batch; the seeded rows' logits are the same whatever the slot."""
    generators = {i: make_generator(p.seed) if p.seed is not None else None for i, p in slots.items()}
    sampler, history = Sampler(), {i: [] for i in slots}
    for step in range(num_steps):
        rng = np.random.default_rng(step)
        shared = rng.normal(size=vocab_size).astype(np.float32)
        mates = rng.normal(size=(len(slots), vocab_size)).astype(np.float32) * 4
        logits = np.stack([shared if p.seed is not None else mates[i] for i, p in slots.items()])
        rows = [SamplingRow(p, [1, 2], history[i], generators[i]) for i, p in slots.items()]
        for i, token in zip(slots, sampler(torch.from_numpy(logits), rows, EOS).token_ids):
            history[i].append(token)
    return history


@pytest.mark.parametrize("name", list(SEEDED))
def test_seed_gives_the_same_tokens_alone_and_in_any_batch(name):
    params = SEEDED[name]
    alone = run_steps({0: params})[0]
    other_seed = SamplingParams(seed=8, top_p=0.95, top_k=0 if name == "top_k" else 40)
    batch = run_steps({0: SamplingParams(temperature=0.0), 1: SamplingParams(top_k=5), 2: params,
                       3: other_seed, 4: SamplingParams(top_p=0.3), 5: params})
    assert batch[2] == alone and batch[5] == alone
    assert batch[3] != alone   # a different seed gives different tokens
    assert len(set(alone)) > 3  # and the stream is actually random


def test_seeded_draws_follow_the_distribution():
    params, logits = SamplingParams(seed=11, top_p=0.8), small_logits(seed=12)
    generator, sampler, tokens = make_generator(params.seed), Sampler(), []
    row, x = SamplingRow(params, [], [], generator), torch.from_numpy(logits[None])
    for _ in range(4000):
        tokens.append(sampler(x, [row], EOS).token_ids[0])
    assert_distribution(np.array(tokens), ref_distribution(logits, params))


# ---------- CUDA: the same code on the device ----------

@pytest.mark.gpu
def test_cuda_rows_stay_in_the_cpu_support_and_seeds_reproduce():
    logits = np.random.default_rng(13).normal(size=(6, 5000)).astype(np.float32) * 2
    params = [SamplingParams(temperature=0.0, repetition_penalty=1.3, logit_bias={4: 2.0}),
              SamplingParams(top_k=20, temperature=0.8, seed=1, logprobs=3),
              SamplingParams(top_p=0.9, seed=2, presence_penalty=0.5),
              SamplingParams(min_p=0.1, frequency_penalty=0.4),
              SamplingParams(top_k=1000, top_p=0.8, min_tokens=5, stop_token_ids=[7]),
              SamplingParams(temperature=0.7, seed=3)]
    history = ([1, 2, 4], [4, 4, 9])

    def run(order):
        rows = [SamplingRow(params[i], *history, make_generator(params[i].seed, "cuda")
                            if params[i].seed is not None else None) for i in order]
        out = Sampler()(torch.from_numpy(logits[order]).cuda(), rows, EOS)
        return dict(zip(order, out.token_ids)), dict(zip(order, out.logprobs))

    tokens, logprobs = run([0, 1, 2, 3, 4, 5])
    for i, p in enumerate(params):
        x = apply_penalties(torch.from_numpy(logits[i:i + 1]), [SamplingRow(p, *history)], EOS)
        if p.is_greedy:
            assert tokens[i] == int(x.argmax())
        else:
            assert torch.isfinite(apply_filters(x, [p])[0, tokens[i]])
        assert logprobs[i] == pytest.approx(log_softmax(logits[i])[tokens[i]], abs=1e-4)
    reordered, _ = run([5, 3, 2, 0, 1, 4])
    assert all(reordered[i] == tokens[i] for i in (0, 1, 2, 5))


def test_greedy_masked_rows_pick_the_argmax_of_the_masked_logits():
    """All-greedy batches whose only stage is a mask (ignore_eos, min_tokens) take the argmax straight off
    the raw logits unless a row's pick is masked; either way every row gets the masked argmax, ties to the
    first, and the logits are not written."""
    gen = torch.Generator().manual_seed(3)
    eos = frozenset({2, 5})
    for trial in range(20):
        logits = torch.randn(6, 40, generator=gen)
        logits[1, 7] = logits[1, 9] = logits[1].max() + 1   # a tie: the first maximum wins
        if trial % 2:
            logits[trial % 6, 5] = logits[trial % 6].max() + 2   # an eos id on top: the next best instead
        params = [SamplingParams(temperature=0.0, ignore_eos=True),
                  SamplingParams(temperature=0.0, min_tokens=4, stop_token_ids=[11])]
        rows = [SamplingRow(params[i % 2], [1], [1] * (i % 3)) for i in range(6)]
        raw = logits.clone()
        got = Sampler(seed=0)(logits, rows, eos).token_ids
        assert torch.equal(logits, raw)
        expected = [int(apply_penalties(raw[i:i + 1], rows[i:i + 1], eos).argmax()) for i in range(6)]
        assert got == expected and got[1] == 7
