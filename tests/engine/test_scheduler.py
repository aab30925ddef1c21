"""Scheduler: budgets, FCFS, chunked prefill, preemption, prefix caching, aborts, stop conditions.

No model: a fake runner writes each computed token's id into its paged-KV slot and checks, before
every step, that each position a row attends to holds that sequence's token there. That catches a
wrong block table, a bad prefix-cache hit, or a block reused while still referenced.
"""
import random
import zlib

import pytest

from engine.block_manager import BlockManager
from engine.sequence import Sequence, SequenceStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import Batch, PromptTooLongError, ScheduledSeq, Scheduler, SchedulerConfig

EOS = 2


def make(num_blocks=64, block_size=4, eos=(EOS,), **config) -> Scheduler:
    config.setdefault("max_model_len", 4096)
    config.setdefault("max_num_seqs", 8)
    cfg = SchedulerConfig(block_size=block_size, **config)
    return Scheduler(cfg, BlockManager(num_blocks, block_size, cfg.enable_prefix_caching), frozenset(eos))


def seq(seq_id, prompt, **params) -> Sequence:
    if isinstance(prompt, int):  # distinct per sequence, so only explicit prompts share prefixes
        prompt = [token_for(f"{seq_id}/prompt", i) for i in range(prompt)]
    return Sequence(seq_id, prompt, SamplingParams(**params))


def token_for(seq_id: str, index: int) -> int:
    """The made-up 'model': output index -> id, a function of the sequence alone (never EOS)."""
    return 10 + zlib.crc32(f"{seq_id}/{index}".encode()) % 5000


class FakeRunner:
    def __init__(self, sched: Scheduler, script: dict[str, list[int]] | None = None):
        bm = sched.block_manager
        self.bm, self.bs, self.script = bm, bm.block_size, script or {}
        self.kv = [[None] * bm.block_size for _ in range(bm.num_blocks)]

    def slot(self, s: Sequence, pos: int) -> tuple[int, int]:
        return s.block_table[pos // self.bs], pos % self.bs

    def execute(self, batch: Batch) -> list[int | None]:
        sampled = []
        for row in batch.seqs:
            s, ids = row.seq, row.seq.all_token_ids
            assert s.status is SequenceStatus.RUNNING and s.num_computed_tokens == row.start
            assert 0 < row.num_tokens and row.end <= s.num_tokens
            assert row.sample == (row.end == s.num_tokens)
            assert len(s.block_table) * self.bs >= row.end
            for pos in range(row.start):
                b, o = self.slot(s, pos)
                assert self.kv[b][o] == ids[pos], f"{s.seq_id}: stale KV at position {pos}"
            for pos in range(row.start, row.end):
                b, o = self.slot(s, pos)
                assert self.bm.ref_counts[b] == 1, f"{s.seq_id}: writing into shared block {b}"
                self.kv[b][o] = ids[pos]
            if row.sample:
                script = self.script.get(s.seq_id)
                n = s.num_output_tokens
                sampled.append(script[n] if script else token_for(s.seq_id, n))
            else:
                sampled.append(None)
        return sampled


def check_invariants(sched: Scheduler) -> None:
    bm, running, waiting = sched.block_manager, sched.running, list(sched.waiting)
    expected = [0] * bm.num_blocks
    for s in running:
        assert s.status is SequenceStatus.RUNNING
        assert len(s.block_table) == bm.num_blocks_for(s.num_computed_tokens)
        for b in s.block_table:
            expected[b] += 1
    for s in waiting:
        assert s.status is SequenceStatus.WAITING and not s.block_table and s.num_computed_tokens == 0
    assert all(r >= 0 for r in bm.ref_counts) and bm.ref_counts == expected
    free, cached_free = list(bm._free), list(bm._cached_free)
    assert len(set(free)) == len(free) and not set(free) & set(cached_free)
    assert sorted(free + cached_free) == [b for b in range(bm.num_blocks) if expected[b] == 0]
    assert all(bm.block_hash[b] is None for b in free) and all(bm.block_hash[b] for b in cached_free)
    assert {h: b for b, h in enumerate(bm.block_hash) if h is not None} == bm._hash_to_block
    assert len(running) <= sched.config.max_num_seqs
    ranks = [sched._rank_of(s) for s in running]
    assert ranks == sorted(ranks)
    ranks = [sched._rank_of(s) for s in waiting]
    assert ranks == sorted(ranks)
    assert len({s.seq_id for s in running + waiting}) == len(running) + len(waiting)


def check_batch(sched: Scheduler, batch: Batch) -> None:
    rows = batch.seqs
    assert batch.num_batched_tokens == sum(r.num_tokens for r in rows)
    assert batch.num_batched_tokens <= sched.config.max_num_batched_tokens
    assert 0 < len(rows) <= sched.config.max_num_seqs
    assert all(r.num_tokens == 1 and r.sample for r in rows[:batch.num_decodes])
    assert not any(r.num_tokens == 1 and r.sample for r in rows[batch.num_decodes:])
    assert len({id(r.seq) for r in rows}) == len(rows)


def run(sched: Scheduler, runner: FakeRunner, max_steps=10_000, on_step=None) -> list[Batch]:
    batches = []
    for step in range(max_steps):
        if not sched.has_unfinished():
            return batches
        batch = sched.schedule()
        assert batch is not None, "work left but nothing scheduled: the queue is wedged"
        check_batch(sched, batch)
        sched.update(batch, runner.execute(batch))
        check_invariants(sched)
        batches.append(batch)
        if on_step:
            on_step(step)
    raise AssertionError("did not finish")


def test_chunked_prefill_respects_budget_and_puts_decodes_first():
    sched = make(num_blocks=128, max_num_batched_tokens=64, max_num_seqs=8)
    runner = FakeRunner(sched)
    a = seq("a", 10, max_tokens=30)
    sched.add(a)
    sched.update(b := sched.schedule(), runner.execute(b))
    long = seq("long", list(range(5000, 5200)), max_tokens=2)
    sched.add(long)
    starts = []
    while long.num_output_tokens == 0:
        batch = sched.schedule()
        check_batch(sched, batch)
        assert batch.num_decodes == 1 and batch.seqs[0].seq is a   # the decode rides along
        assert batch.num_batched_tokens == 64 or batch.seqs[1].sample
        chunk = batch.seqs[1]
        starts.append(chunk.start)
        assert chunk.sample == (chunk.end == 200)
        sched.update(batch, runner.execute(batch))
        check_invariants(sched)
    assert starts == [0, 63, 126, 189]
    run(sched, runner)
    assert a.num_output_tokens == 30 and long.num_output_tokens == 2


def test_without_chunked_prefill_a_prompt_waits_for_a_whole_budget():
    sched = make(max_num_batched_tokens=100, max_model_len=100, enable_chunked_prefill=False)
    runner = FakeRunner(sched)
    sched.add(a := seq("a", 10, max_tokens=5))
    sched.add(b := seq("b", 95, max_tokens=5))
    batches = run(sched, runner)
    assert batches[0].seqs[0].seq is a and len(batches[0].seqs) == 1  # 10 + 95 > 100
    assert all(r.num_tokens in (1, 95) for batch in batches for r in batch.seqs if r.seq is b)
    assert b.num_output_tokens == 5


def test_max_num_seqs_is_honoured_and_admission_is_fcfs():
    sched = make(max_num_seqs=3, max_num_batched_tokens=64)
    runner = FakeRunner(sched)
    seqs = [seq(f"s{i}", 5 + i, max_tokens=3 + (7 * i) % 5) for i in range(10)]
    for s in seqs:
        sched.add(s)
    first_step = {}
    for step, batch in enumerate(run(sched, runner)):
        assert len(batch.seqs) <= 3
        for r in batch.seqs:
            first_step.setdefault(r.seq.seq_id, step)
    order = sorted(first_step, key=lambda k: (first_step[k], int(k[1:])))
    assert order == [s.seq_id for s in seqs]
    assert all(s.num_output_tokens == s.params.max_tokens for s in seqs)


def test_head_of_queue_is_not_overtaken():
    sched = make(num_blocks=8, block_size=4, max_num_batched_tokens=64)
    runner = FakeRunner(sched)
    sched.add(a := seq("a", 20, max_tokens=4))     # 5 blocks + growth
    sched.add(big := seq("big", 24, max_tokens=1))  # 6 blocks: waits for a
    sched.add(small := seq("small", 3, max_tokens=1))
    batches = run(sched, runner)
    admitted = [r.seq for batch in batches for r in batch.seqs if r.start == 0]
    assert admitted == [a, big, small]


def test_preemption_under_a_tiny_cache_finishes_everything():
    sched = make(num_blocks=6, block_size=4, max_num_batched_tokens=32, enable_prefix_caching=False)
    runner = FakeRunner(sched)
    seqs = [seq(f"s{i}", 5 + i % 4, max_tokens=12) for i in range(8)]
    for s in seqs:
        sched.add(s)
    run(sched, runner)
    stats = sched.stats()
    assert stats.num_preemptions > 0
    assert stats.num_blocks_used == 0 and sched.block_manager.num_free_blocks == 6
    for s in seqs:  # nothing dropped or duplicated across the re-prefills
        assert s.output_token_ids == [token_for(s.seq_id, i) for i in range(12)]
        assert s.finish_reason == "length"
    assert stats.num_generation_tokens == 8 * 12
    assert stats.num_prompt_tokens >= sum(s.num_prompt_tokens for s in seqs)


def test_preempted_sequence_goes_back_to_the_front_of_the_queue():
    sched = make(num_blocks=4, block_size=4, max_num_batched_tokens=32, enable_prefix_caching=False)
    runner = FakeRunner(sched)
    sched.add(a := seq("a", 7, max_tokens=8))
    sched.add(b := seq("b", 7, max_tokens=8))
    sched.add(c := seq("c", 3, max_tokens=2))
    sched.update(batch := sched.schedule(), runner.execute(batch))     # a and b: 2 blocks each
    assert sched.num_running == 2 and sched.block_manager.num_free_blocks == 0
    batch = sched.schedule()   # a's 8th token fits its block; b's too; the 9th needs a new block
    sched.update(batch, runner.execute(batch))
    batch = sched.schedule()
    assert [r.seq for r in batch.seqs] == [a] and sched.stats().num_preemptions == 1
    assert list(sched.waiting) == [b, c] and b.num_computed_tokens == 0 and b.num_output_tokens == 2
    sched.update(batch, runner.execute(batch))
    run(sched, runner)
    assert [s.output_token_ids for s in (a, b, c)] == [
        [token_for(s.seq_id, i) for i in range(s.params.max_tokens)] for s in (a, b, c)]


def test_two_partial_prefills_short_of_blocks_do_not_wedge():
    # A state the policy avoids, set up by hand: two prompts half prefilled, holding every block.
    sched = make(num_blocks=4, block_size=4, max_num_batched_tokens=8, enable_prefix_caching=False)
    runner = FakeRunner(sched)
    a, b = seq("a", 12, max_tokens=3), seq("b", 12, max_tokens=3)
    for s in (a, b):
        sched.add(s)
        sched.waiting.popleft()
        sched.block_manager.allocate(s, 8)
        s.status = SequenceStatus.RUNNING
        sched.running.append(s)
        runner.execute(Batch([ScheduledSeq(s, 0, 8, False)], 8, 0))
        s.num_computed_tokens = 8
    check_invariants(sched)
    batch = sched.schedule()
    assert [(r.seq, r.start, r.num_tokens) for r in batch.seqs] == [(a, 8, 4)]
    assert list(sched.waiting) == [b] and sched.stats().num_preemptions == 1
    sched.update(batch, runner.execute(batch))
    check_invariants(sched)
    run(sched, runner)
    for s in (a, b):
        assert s.output_token_ids == [token_for(s.seq_id, i) for i in range(3)]


def test_abort_frees_blocks_of_running_and_waiting_sequences():
    sched = make(num_blocks=8, block_size=4, max_num_seqs=1)
    runner = FakeRunner(sched)
    sched.add(a := seq("a", 10, max_tokens=50))
    sched.add(b := seq("b", 10, max_tokens=50))
    sched.update(batch := sched.schedule(), runner.execute(batch))
    assert sched.block_manager.num_used_blocks == 3 and sched.num_waiting == 1
    assert sched.abort("b") is b and b.finish_reason == "abort" and b.is_finished
    assert sched.abort("a") is a and a.status is SequenceStatus.FINISHED_ABORTED
    assert sched.block_manager.num_used_blocks == 0 and not sched.has_unfinished()
    assert sched.abort("a") is None and sched.schedule() is None
    check_invariants(sched)


def test_abort_between_schedule_and_update_is_skipped():
    sched = make()
    runner = FakeRunner(sched)
    sched.add(a := seq("a", 10, max_tokens=5))
    sched.add(b := seq("b", 10, max_tokens=5))
    batch = sched.schedule()
    sampled = runner.execute(batch)
    sched.abort("a")
    assert sched.update(batch, sampled) == [] and a.num_output_tokens == 0
    check_invariants(sched)
    run(sched, runner)
    assert b.num_output_tokens == 5 and sched.block_manager.num_used_blocks == 0


def test_prefix_cache_serves_a_shared_200_token_prefix():
    sched = make(num_blocks=256, block_size=16, max_num_batched_tokens=512)
    runner = FakeRunner(sched)
    prefix = [1000 + i for i in range(200)]
    sched.add(a := seq("a", prefix + [1, 2, 3], max_tokens=4))
    run(sched, runner)
    sched.add(b := seq("b", prefix + [4, 5, 6, 7, 8], max_tokens=4))
    batch = sched.schedule()
    (row,) = batch.seqs
    assert row.start == b.num_cached_tokens == 192 and row.num_tokens == 205 - 192
    stats = sched.stats()
    assert stats.prefix_cache_hits == 192 and stats.prefix_cache_queries == 203 + 205
    sched.update(batch, runner.execute(batch))  # the fake runner checks the 192 cached positions
    run(sched, runner)
    assert sched.stats().num_prompt_tokens == 203 + 205 - 192
    assert b.output_token_ids == [token_for("b", i) for i in range(4)]


def test_identical_prompt_recomputes_at_least_its_last_block():
    sched = make(num_blocks=64, block_size=16)
    runner = FakeRunner(sched)
    sched.add(seq("a", list(range(64)), max_tokens=1))
    run(sched, runner)
    sched.add(seq("b", list(range(64)), max_tokens=1))
    (row,) = sched.schedule().seqs
    assert row.start == 48 and row.num_tokens == 16 and row.sample


@pytest.mark.parametrize("params, script, expected, reason, stop_id", [
    (dict(max_tokens=10), [5, 6, EOS, 7], [5, 6, EOS], "stop", EOS),
    (dict(max_tokens=10, ignore_eos=True), [5, EOS, 6, EOS, 7, 8, 9, 10, 11, 12],
     [5, EOS, 6, EOS, 7, 8, 9, 10, 11, 12], "length", None),
    (dict(max_tokens=10, min_tokens=3), [EOS, 5, EOS, EOS], [EOS, 5, EOS], "stop", EOS),
    (dict(max_tokens=10, stop_token_ids=[42]), [5, 42, 6], [5, 42], "stop", 42),
    (dict(max_tokens=10, min_tokens=2, stop_token_ids=[42]), [42, 42, 6], [42, 42], "stop", 42),
    (dict(max_tokens=3), [5, 6, 7, 8], [5, 6, 7], "length", None),
    (dict(max_tokens=3), [5, 6, EOS], [5, 6, EOS], "stop", EOS),
])
def test_stop_conditions(params, script, expected, reason, stop_id):
    sched = make()
    sched.add(s := seq("s", 5, **params))
    run(sched, FakeRunner(sched, {"s": script}))
    assert (s.output_token_ids, s.finish_reason, s.stop_token_id) == (expected, reason, stop_id)


def test_max_model_len_caps_the_output():
    sched = make(max_model_len=16)
    sched.add(s := seq("s", 10, max_tokens=None))
    run(sched, FakeRunner(sched))
    assert s.num_tokens == 16 and s.finish_reason == "length"


def test_a_sequence_the_cache_cannot_hold_finishes_with_length():
    sched = make(num_blocks=2, block_size=4, max_model_len=100)
    sched.add(s := seq("s", 6, max_tokens=50))
    run(sched, FakeRunner(sched))
    assert s.num_tokens == 8 and s.finish_reason == "length"


def test_add_rejects_prompts_that_can_never_run():
    sched = make(num_blocks=4, block_size=4, max_model_len=20)
    with pytest.raises(PromptTooLongError, match="max_model_len"):
        sched.add(seq("a", 21))
    with pytest.raises(PromptTooLongError, match="KV blocks"):
        sched.add(seq("b", 17))
    with pytest.raises(PromptTooLongError, match="empty"):
        sched.add(seq("c", []))
    sched.add(seq("d", 16, max_tokens=5))
    with pytest.raises(ValueError, match="already"):
        sched.add(seq("d", 3))
    assert sched.num_waiting == 1 and sched.num_running == 0


def test_config_validation():
    with pytest.raises(ValueError, match="max_num_seqs"):
        SchedulerConfig(max_model_len=100, max_num_seqs=300, max_num_batched_tokens=256)
    with pytest.raises(ValueError, match="chunked"):
        SchedulerConfig(max_model_len=4096, enable_chunked_prefill=False)
    with pytest.raises(ValueError, match="block_size"):
        SchedulerConfig(max_model_len=100, block_size=0)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("prefix_caching, chunked", [(True, True), (False, True), (True, False)])
def test_randomized_workloads_keep_invariants(seed, prefix_caching, chunked):
    rng = random.Random(seed)
    bs = rng.choice([2, 4, 8])
    num_blocks = rng.randint(6, 24)
    sched = make(num_blocks=num_blocks, block_size=bs, max_num_seqs=rng.randint(1, 8),
                 max_num_batched_tokens=rng.choice([8, 16, 64]) if chunked else 64,
                 max_model_len=64, enable_prefix_caching=prefix_caching, enable_chunked_prefill=chunked)
    runner = FakeRunner(sched)
    shared = [rng.randint(10, 30) for _ in range(3 * bs)]
    pending = []
    for i in range(30):
        prompt = shared[:rng.randint(0, len(shared))] + [rng.randint(10, 5000) for _ in range(rng.randint(1, 12))]
        pending.append(seq(f"r{i}", prompt[:min(len(prompt), num_blocks * bs)], max_tokens=rng.randint(1, 20)))
    added, aborted = [], set()

    def churn(step):
        if pending and rng.random() < 0.5:
            sched.add(s := pending.pop())
            added.append(s)
        if rng.random() < 0.05 and added:
            victim = rng.choice(added)
            if sched.abort(victim.seq_id):
                aborted.add(victim.seq_id)
        check_invariants(sched)

    sched.add(s := pending.pop())
    added.append(s)
    while pending or sched.has_unfinished():
        run(sched, runner, on_step=churn)
        if pending:
            churn(0)
    assert sched.block_manager.num_used_blocks == 0
    for s in added:
        assert s.is_finished
        if s.seq_id in aborted:
            continue
        limit = max(1, min(s.params.max_tokens, sched.max_seq_len - s.num_prompt_tokens))
        assert s.output_token_ids == [token_for(s.seq_id, i) for i in range(limit)], s
    assert sched.stats().num_generation_tokens == sum(s.num_output_tokens for s in added)
