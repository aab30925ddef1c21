"""Sampler: a batch of logits and per-row sampling parameters -> chosen token ids and logprobs."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from engine.sampling_params import SamplingParams

# Rows whose top_k is at most this sample among their top-k candidates only (one topk, k uniforms per row);
# others sample over the whole vocabulary.
TOPK_CANDIDATE_LIMIT = 256
_PROMPT_LOGPROBS_CHUNK = 512
_NEG_INF = float("-inf")
# Uniforms kept inside (0, 1) so -log(-log(u)) is finite: no row can pick a masked (-inf) token.
_U_MIN = torch.finfo(torch.float32).tiny
_U_MAX = 1.0 - torch.finfo(torch.float32).eps


@dataclass(frozen=True, slots=True)
class SamplingRow:
    """One batch row as the sampler sees it."""
    params: SamplingParams
    prompt_token_ids: Sequence[int]         # the request's own list: read, never mutated
    output_token_ids: Sequence[int]         # ids generated so far (same)
    generator: torch.Generator | None = None  # per request, from make_generator(params.seed); None = unseeded


@dataclass(frozen=True, slots=True)
class SamplerOutput:
    token_ids: list[int]                    # [B] chosen token per row
    logprobs: list[float]                   # [B] chosen token's logprob under log_softmax(raw logits); NaN
    #                                         for all when no row needs them (SamplingParams.needs_token_logprobs)
    # [B] top-k (id, logprob) of the raw distribution for rows with params.logprobs set ([] for others);
    # None when no row asked
    top_logprobs: list[list[tuple[int, float]]] | None


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The per-request generator for a seeded request; the engine keeps it across steps."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def _column(values: list, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A per-row (or per-pair) parameter tensor on `like`'s device, built once per call."""
    return torch.tensor(values, dtype=dtype or like.dtype, device=like.device)


def apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow],
                    eos_token_ids: frozenset[int]) -> torch.Tensor:
    """logit_bias -> min_tokens/ignore_eos masks -> repetition -> presence/frequency, on [B, V] logits.

    Returns `logits` itself when no row uses any of them, else a new tensor (the input is never written).
    """
    if not any(_penalty_stages(rows)):
        return logits
    x = logits.clone(memory_format=torch.contiguous_format)
    penalize_in_place(x, rows, eos_token_ids)
    return x


@dataclass(frozen=True, slots=True)
class PenaltyUndo:
    """The (row, token) logits penalize_in_place overwrote, stage by stage: (rows, token ids, values before)."""
    saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]

    def restore(self, logits: torch.Tensor) -> None:
        """Put the raw logits back, exactly: latest stage first, so each pair ends at its value before all."""
        for row_ids, token_ids, values in reversed(self.saved):
            logits[row_ids, token_ids] = values


def _penalty_stages(rows: Sequence[SamplingRow]) -> tuple[list[int], list[int], list[int], list[int]]:
    """The rows each stage concerns: logit_bias, masks, repetition, presence/frequency."""
    biased = [i for i, r in enumerate(rows) if r.params.logit_bias]
    masked = [i for i, r in enumerate(rows)
              if r.params.ignore_eos or len(r.output_token_ids) < r.params.min_tokens]
    repeated = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0]
    counted = [i for i, r in enumerate(rows)
               if r.params.presence_penalty != 0.0 or r.params.frequency_penalty != 0.0]
    return biased, masked, repeated, counted


def penalize_in_place(x: torch.Tensor, rows: Sequence[SamplingRow],
                      eos_token_ids: frozenset[int]) -> PenaltyUndo | None:
    """apply_penalties written into x itself; returns what restores x's raw values (None: nothing written).
    NOTE: the sampler's way: a copy of [B, V] logits a step (B x 196 KB at a 49k vocabulary, fresh pages each
    time) costs more than the penalties, whose cost scales with the (row, token) pairs they touch."""
    biased, masked, repeated, counted = _penalty_stages(rows)
    if not (biased or masked or repeated or counted):
        return None
    vocab_size = x.shape[-1]
    saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def keep(row_ids: torch.Tensor, token_ids: torch.Tensor) -> None:
        saved.append((row_ids, token_ids, x[row_ids, token_ids]))

    if biased:
        row_ids, token_ids, biases = [], [], []
        for i in biased:
            for token_id, bias in rows[i].params.logit_bias.items():
                row_ids.append(i)
                token_ids.append(int(token_id))
                biases.append(bias)
        # NOTE: logit_bias ids are checked against the vocabulary at the API seam; a bad id raises here.
        row_index, token_index = _column(row_ids, x, torch.long), _column(token_ids, x, torch.long)
        keep(row_index, token_index)
        x.index_put_((row_index, token_index), _column(biases, x), accumulate=True)

    if masked:
        row_ids, token_ids = [], []
        for i in masked:
            banned = _banned(rows[i], eos_token_ids, vocab_size)
            row_ids += [i] * len(banned)
            token_ids += banned
        if row_ids:
            row_index, token_index = _column(row_ids, x, torch.long), _column(token_ids, x, torch.long)
            keep(row_index, token_index)
            x[row_index, token_index] = _NEG_INF

    if repeated:
        # HF semantics over prompt + output ids, each distinct id once: positive logits shrink by /p,
        # negative ones by *p
        rows_, ids, _ = _unique_pairs(rows, repeated, x, with_prompt=True)
        penalty = _column([r.params.repetition_penalty for r in rows], x)[rows_]
        keep(rows_, ids)
        values = saved[-1][2]
        x[rows_, ids] = torch.where(values > 0, values / penalty, values * penalty)

    if counted:
        # OpenAI semantics over output ids: logit -= count * frequency + (count > 0) * presence
        rows_, ids, counts = _unique_pairs(rows, counted, x, with_prompt=False)
        presence = _column([r.params.presence_penalty for r in rows], x)[rows_]
        frequency = _column([r.params.frequency_penalty for r in rows], x)[rows_]
        keep(rows_, ids)
        x[rows_, ids] = saved[-1][2] - (counts.to(x.dtype) * frequency + presence)
    return PenaltyUndo(saved)


def _banned(row: SamplingRow, eos_token_ids: frozenset[int], vocab_size: int) -> list[int]:
    """The ids a row's masks rule out this step: eos under ignore_eos; eos and stop ids before min_tokens."""
    params = row.params
    banned = set(eos_token_ids) if params.ignore_eos else set()
    if len(row.output_token_ids) < params.min_tokens:
        banned |= eos_token_ids
        banned.update(params.stop_token_ids)
    # stop ids outside the model's vocabulary can never be sampled: nothing to mask
    return [t for t in banned if 0 <= t < vocab_size]


def _greedy_past_masks(logits: torch.Tensor, rows: Sequence[SamplingRow],
                       eos_token_ids: frozenset[int]) -> tuple[torch.Tensor, list[int]] | None:
    """All rows greedy, masks their only stage: the argmax, where no row's pick is one of its masked ids
    (then masking could not have changed it: the first maximum stays the first maximum when other entries
    only go down); None where one is, or another stage applies (the full path then runs).
    NOTE: the masks are for ignore_eos and min_tokens, which a benchmark sets on every row: writing and
    restoring them costs ~8 small tensor ops a step, each slow after the step's weights flushed the caches."""
    if not all(r.params.is_greedy for r in rows):
        return None
    biased, masked, repeated, counted = _penalty_stages(rows)
    if biased or repeated or counted:
        return None
    token_ids = logits.argmax(dim=-1)
    ids = token_ids.tolist()
    vocab_size = logits.shape[-1]
    if any(ids[i] in _banned(rows[i], eos_token_ids, vocab_size) for i in masked):
        return None
    return token_ids, ids


def _unique_pairs(rows: Sequence[SamplingRow], selected: list[int], x: torch.Tensor, with_prompt: bool):
    """Distinct (row, token) pairs over the selected rows' ids, with how often each occurs."""
    token_ids: list[int] = []
    lengths = []
    for i in selected:
        before = len(token_ids)
        token_ids += rows[i].output_token_ids
        if with_prompt:
            token_ids += rows[i].prompt_token_ids
        lengths.append(len(token_ids) - before)
    # keys = row * V + token, made distinct on the host (torch.unique on a GPU would sync to size its
    # output), then one host->device copy for all rows
    vocab_size = x.shape[-1]
    offsets = np.repeat(np.asarray(selected, dtype=np.int64) * vocab_size, lengths)
    keys, counts = np.unique(np.asarray(token_ids, dtype=np.int64) + offsets, return_counts=True)
    keys = torch.from_numpy(keys).to(x.device)
    return keys // vocab_size, keys % vocab_size, torch.from_numpy(counts).to(x.device)


def _descending(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest values of each row, sorted descending (values only)."""
    vocab_size = x.shape[-1]
    if k <= TOPK_CANDIDATE_LIMIT and k < vocab_size:
        return x.topk(k, dim=-1).values
    if x.device.type == "cpu":
        # torch's CPU sort is ~10x slower than numpy's SIMD sort, and thresholds need values only
        ascending = np.sort(x.detach().contiguous().numpy(), axis=-1)
        return torch.from_numpy(np.ascontiguousarray(ascending[:, ::-1][:, :k]))
    return x.sort(dim=-1, descending=True).values[:, :k]


def _thresholds(desc: torch.Tensor, params: Sequence[SamplingParams], vocab_size: int) -> torch.Tensor:
    """[B] logit below which a row's tokens are dropped, combining top_k -> top_p -> min_p.

    `desc` holds each row's largest logits sorted descending; it must reach every row's top_k and, for
    rows with top_p < 1, the whole support that top_k leaves.
    """
    num_candidates = desc.shape[-1]
    threshold = torch.full_like(desc[:, 0], _NEG_INF)
    top_k = [p.top_k if 0 < p.top_k < vocab_size else 0 for p in params]
    if any(top_k):
        assert max(top_k) <= num_candidates
        kth = desc.gather(1, _column([max(k, 1) - 1 for k in top_k], desc, torch.long)[:, None])[:, 0]
        threshold = torch.where(_column(top_k, desc, torch.long) > 0, kth, threshold)
    if any(p.top_p < 1.0 for p in params):
        # keep the smallest prefix whose mass reaches top_p: token i stays iff mass(tokens < i) < top_p,
        # so the count kept is 1 + #{i: cumsum_i < top_p} (cumsum of non-negatives is sorted)
        kept = desc.masked_fill(desc < threshold[:, None], _NEG_INF) if any(top_k) else desc
        cumulative = kept.softmax(dim=-1).cumsum_(dim=-1)
        top_p = _column([p.top_p if p.top_p < 1.0 else math.inf for p in params], desc)
        num_kept = (torch.searchsorted(cumulative, top_p[:, None]) + 1).clamp_(max=num_candidates)
        last = desc.gather(1, num_kept - 1)[:, 0]
        threshold = torch.where(top_p < 1.0, torch.maximum(threshold, last), threshold)
    if any(p.min_p > 0.0 for p in params):
        # p_i >= min_p * p_max  <=>  logit_i >= max_logit + log(min_p); log(0) = -inf keeps everything
        log_min_p = _column([math.log(p.min_p) if p.min_p > 0 else _NEG_INF for p in params], desc)
        threshold = torch.maximum(threshold, desc[:, 0] + log_min_p)
    return threshold


def _scale_by_temperature(x: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    assert all(p.temperature > 0 for p in params), "greedy rows take the argmax, never the filters"
    if all(p.temperature == 1.0 for p in params):
        return x
    return x / _column([p.temperature for p in params], x)[:, None]


def apply_filters(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """temperature -> top_k -> top_p -> min_p over the whole vocabulary: dropped tokens become -inf.

    Ties with the cut-off logit are kept. Never writes into `logits`.
    """
    vocab_size = logits.shape[-1]
    x = _scale_by_temperature(logits, params)
    if not any(0 < p.top_k < vocab_size or p.top_p < 1.0 or p.min_p > 0.0 for p in params):
        return x
    # how many of the largest logits the thresholds need: the whole row once top_p has no top_k under it
    needs_support = any(p.top_p < 1.0 and not 0 < p.top_k < vocab_size for p in params)
    num_candidates = vocab_size if needs_support else max(
        [p.top_k for p in params if 0 < p.top_k < vocab_size], default=1)
    desc = _descending(x, num_candidates) if num_candidates > 1 else x.amax(dim=-1, keepdim=True)
    return x.masked_fill(x < _thresholds(desc, params, vocab_size)[:, None], _NEG_INF)


def _uniforms(shape: tuple[int, int], draw_sizes: list[int], generators: list[torch.Generator | None],
              shared: torch.Generator, device: torch.device) -> torch.Tensor:
    """[B, N] uniforms; a seeded row draws exactly its draw_size values from its own generator, so its
    stream does not depend on batch mates, batch position or N."""
    u = torch.empty(shape, device=device).uniform_(generator=shared)
    for i, (size, generator) in enumerate(zip(draw_sizes, generators)):
        if generator is not None:
            u[i, :size].uniform_(generator=generator)   # columns past size are masked candidates
    return u


def _race(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Exponential race: argmax(p / E) with E = -log(u) ~ Exp(1), taken in log space as
    argmax(logit - log E), which needs no softmax and cannot underflow. No host sync.

    NOTE: max(dim).indices, not argmax: the same first-maximum tie rule, about 2x faster on CPU.
    """
    return u.clamp_(_U_MIN, _U_MAX).log_().neg_().log_().neg_().add_(logits).max(dim=-1).indices


def _sample_candidates(x: torch.Tensor, rows: Sequence[SamplingRow], shared: torch.Generator) -> torch.Tensor:
    """Rows with 0 < top_k <= TOPK_CANDIDATE_LIMIT: filter and race among each row's top-k only."""
    params = [r.params for r in rows]
    num_candidates = max(p.top_k for p in params)
    values, ids = x.topk(num_candidates, dim=-1)   # [B, K] descending; temperature keeps the order
    values = _scale_by_temperature(values, params)
    threshold = _thresholds(values, params, x.shape[-1])
    position = torch.arange(num_candidates, device=x.device)
    # by position rather than value, so a row never keeps more than its own top_k candidates
    dropped = (values < threshold[:, None]) | (position >= _column([p.top_k for p in params], ids)[:, None])
    u = _uniforms(tuple(values.shape), [p.top_k for p in params], [r.generator for r in rows],
                  shared, x.device)
    chosen = _race(values.masked_fill(dropped, _NEG_INF), u)
    return ids.gather(1, chosen[:, None])[:, 0]


def _sample_vocabulary(x: torch.Tensor, rows: Sequence[SamplingRow], shared: torch.Generator) -> torch.Tensor:
    vocab_size = x.shape[-1]
    u = _uniforms(tuple(x.shape), [vocab_size] * len(rows), [r.generator for r in rows], shared, x.device)
    return _race(apply_filters(x, [r.params for r in rows]), u)


class Sampler:
    """Turns one step's logits into token ids: penalties, greedy/argmax or filtered sampling, logprobs."""

    def __init__(self, seed: int | None = None):
        self._seed = seed   # for the generator shared by unseeded rows; None = nondeterministic
        self._generators: dict[torch.device, torch.Generator] = {}

    def _shared_generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            generator = torch.Generator(device=device)
            if self._seed is None:
                generator.seed()
            else:
                generator.manual_seed(self._seed)
            self._generators[device] = generator
        return self._generators[device]

    def _choose(self, x: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """[B] token ids from penalized logits: argmax for greedy rows, filtered sampling for the others."""
        sampled = [i for i, r in enumerate(rows) if not r.params.is_greedy]
        token_ids = x.argmax(dim=-1) if len(sampled) < len(rows) else None
        if sampled:
            shared = self._shared_generator(x.device)
            # split by path; each row's path depends on its own params only, keeping seeded rows
            # reproducible whatever their batch mates
            limit = min(TOPK_CANDIDATE_LIMIT, x.shape[-1] - 1)
            few = [i for i in sampled if 0 < rows[i].params.top_k <= limit]
            many = [i for i in sampled if not 0 < rows[i].params.top_k <= limit]
            for group, sample in ((few, _sample_candidates), (many, _sample_vocabulary)):
                if not group:
                    continue
                if len(group) == len(rows):
                    token_ids = sample(x, rows, shared)
                    continue
                index = torch.tensor(group, device=x.device)
                chosen = sample(x.index_select(0, index), [rows[i] for i in group], shared)
                if token_ids is None:
                    token_ids = torch.empty(len(rows), dtype=torch.long, device=x.device)
                token_ids.index_copy_(0, index, chosen)
        return token_ids

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow],
                 eos_token_ids: frozenset[int]) -> SamplerOutput:
        assert logits.dim() == 2 and logits.shape[0] == len(rows), (tuple(logits.shape), len(rows))
        assert logits.dtype == torch.float32, logits.dtype
        fast = _greedy_past_masks(logits, rows, eos_token_ids)
        if fast is not None:
            token_ids, ids = fast
        else:
            # penalties go into the logits themselves and come off again before the logprobs, which are of the
            # raw distribution (exactly: the overwritten values are put back)
            undo = penalize_in_place(logits, rows, eos_token_ids)
            try:
                token_ids = self._choose(logits, rows)
            finally:
                if undo is not None:
                    undo.restore(logits)
            ids = None

        if not any(r.params.needs_token_logprobs for r in rows):
            # nobody reads them (no logprobs asked, no best_of to rank): skip the [B, V] logsumexp
            return SamplerOutput(token_ids.tolist() if ids is None else ids, [math.nan] * len(rows), None)
        # logprobs of the raw distribution, as vLLM returns by default
        log_norm = torch.logsumexp(logits, dim=-1)
        chosen_logprobs = logits.gather(1, token_ids[:, None])[:, 0] - log_norm
        # NOTE: one device->host copy for both: float64 holds every token id and float32 logprob exactly
        ids_and_logprobs = torch.stack([token_ids.to(torch.float64), chosen_logprobs.to(torch.float64)]).tolist()
        return SamplerOutput([int(t) for t in ids_and_logprobs[0]], ids_and_logprobs[1],
                             _top_logprobs(logits, log_norm, rows))


def _top_logprobs(logits: torch.Tensor, log_norm: torch.Tensor,
                  rows: Sequence[SamplingRow]) -> list[list[tuple[int, float]]] | None:
    asked = [i for i, r in enumerate(rows) if r.params.logprobs]
    if not asked:
        return None if all(r.params.logprobs is None for r in rows) else [[] for _ in rows]
    k = min(max(rows[i].params.logprobs for i in asked), logits.shape[-1])
    index = torch.tensor(asked, device=logits.device)
    values, ids = logits.index_select(0, index).topk(k, dim=-1)
    values = (values - log_norm.index_select(0, index)[:, None]).tolist()
    ids = ids.tolist()
    result: list[list[tuple[int, float]]] = [[] for _ in rows]
    for j, i in enumerate(asked):
        count = rows[i].params.logprobs
        result[i] = list(zip(ids[j][:count], values[j][:count]))
    return result


def compute_prompt_logprobs(logits: torch.Tensor, target_ids: torch.Tensor | Sequence[int],
                            k: int) -> list[tuple[float, list[tuple[int, float]]]]:
    """Per prompt position t: (logprob of target_ids[t] under logits[t], its top-k (id, logprob)).

    logits [T, V] are the predictions for target_ids [T] (the prompt shifted by one); processed in chunks
    so a long prompt never materialises a second [T, V] tensor.
    """
    targets = torch.as_tensor(target_ids, dtype=torch.long, device=logits.device)
    assert logits.dim() == 2 and targets.shape == (logits.shape[0],), (tuple(logits.shape), tuple(targets.shape))
    result: list[tuple[float, list[tuple[int, float]]]] = []
    for start in range(0, logits.shape[0], _PROMPT_LOGPROBS_CHUNK):
        chunk = logits[start:start + _PROMPT_LOGPROBS_CHUNK].float()
        log_norm = torch.logsumexp(chunk, dim=-1, keepdim=True)
        chosen = (chunk.gather(1, targets[start:start + chunk.shape[0], None]) - log_norm)[:, 0].tolist()
        if k > 0:
            values, ids = chunk.topk(k, dim=-1)
            tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), (values - log_norm).tolist())]
        else:
            tops = [[] for _ in chosen]
        result.extend(zip(chosen, tops))
    return result
