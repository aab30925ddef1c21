"""Continuous batching with chunked prefill and preemption by recompute: schedule() -> Batch."""
from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass

from engine.block_manager import BlockManager
from engine.config import DEFAULT_BLOCK_SIZE, DEFAULT_MAX_NUM_BATCHED_TOKENS, DEFAULT_MAX_NUM_SEQS
from engine.sequence import Sequence, SequenceStatus
from engine.stats import SchedulerStats


class PromptTooLongError(ValueError):
    """A prompt that could never be scheduled: longer than max_model_len or than the whole KV cache."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SchedulerConfig:
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS                      # sequences holding KV blocks at once
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS  # tokens computed per step, decode + prefill
    max_model_len: int                                            # prompt + output never exceeds this
    block_size: int = DEFAULT_BLOCK_SIZE                          # tokens per KV block
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                             f"({self.max_num_seqs}) so every running sequence can decode each step")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(f"without chunked prefill max_num_batched_tokens ({self.max_num_batched_tokens}) "
                             f"must be >= max_model_len ({self.max_model_len}), or long prompts never run")


@dataclass(frozen=True, slots=True)
class ScheduledSeq:
    seq: Sequence     # a reference: the runner reads it, never mutates it
    start: int        # first position computed this step (seq.num_computed_tokens before the step)
    num_tokens: int   # tokens computed this step, positions [start, start + num_tokens)
    sample: bool      # the chunk reaches the last known token: sample the next one from its logits

    @property
    def end(self) -> int:
        return self.start + self.num_tokens


@dataclass(frozen=True, slots=True)
class Batch:
    seqs: list[ScheduledSeq]  # the first num_decodes rows are decodes, then prefill / extend chunks
    num_batched_tokens: int
    num_decodes: int          # rows with num_tokens == 1 and sample == True, all at the front

    @property
    def num_seqs(self) -> int:
        return len(self.seqs)

    @property
    def num_prefills(self) -> int:
        return len(self.seqs) - self.num_decodes

    @property
    def is_decode_only(self) -> bool:
        return self.num_decodes == len(self.seqs)


class Scheduler:
    """Decides each step which sequences compute which tokens, and applies the sampled results.

    Policy, each step: every running decode gets its one token, oldest first (when blocks run out,
    the most recently added running sequence is preempted by recompute: blocks freed, computed count
    reset, outputs kept, back to the front of the queue); then partially prefilled sequences continue;
    then waiting sequences are admitted first come first served while max_num_seqs and the token
    budget allow (no admission in a step that had to preempt).

    A prompt that can never be scheduled makes `add` raise PromptTooLongError. A sequence that grows
    until it alone would need more blocks than the cache has finishes with 'length', like at
    max_model_len. Call `add` / `abort` between steps; an abort between schedule() and update() is
    tolerated (update skips that row), provided the runner has finished writing that step's KV.
    """

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, eos_token_ids: frozenset[int]):
        assert block_manager.block_size == config.block_size, (block_manager.block_size, config.block_size)
        assert block_manager.enable_prefix_caching == config.enable_prefix_caching
        self.config = config
        self.block_manager = block_manager
        self.eos_token_ids = frozenset(eos_token_ids)
        # The longest a sequence may grow: the model's limit, or every block of the cache.
        self.max_seq_len = min(config.max_model_len, block_manager.num_blocks * block_manager.block_size)
        self.waiting: deque[Sequence] = deque()  # sorted by rank: preempted ones come back in order
        self.running: list[Sequence] = []        # sorted by rank, oldest first
        self._live: dict[str, Sequence] = {}
        self._rank: dict[str, int] = {}          # seq_id -> order of add(): FCFS priority
        self._next_rank = 0
        self.num_preemptions = 0
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0

    # -- queue management -------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        if seq.seq_id in self._live:
            raise ValueError(f"sequence {seq.seq_id!r} is already scheduled")
        assert seq.status is SequenceStatus.WAITING and not seq.block_table and seq.num_computed_tokens == 0
        n = seq.num_tokens
        if n == 0:
            raise PromptTooLongError("the prompt is empty: at least one token is needed")
        if n > self.config.max_model_len:
            raise PromptTooLongError(f"the prompt has {n} tokens, more than max_model_len "
                                     f"({self.config.max_model_len})")
        if n > self.max_seq_len:
            bm = self.block_manager
            raise PromptTooLongError(f"the prompt has {n} tokens and needs {bm.num_blocks_for(n)} KV blocks, "
                                     f"but the cache holds only {bm.num_blocks} blocks of {bm.block_size}")
        self._live[seq.seq_id] = seq
        self._rank[seq.seq_id] = self._next_rank
        self._next_rank += 1
        self.waiting.append(seq)

    def abort(self, seq_id: str) -> Sequence | None:
        """Finish a waiting or running sequence at once and free its blocks; None if unknown."""
        seq = self._live.get(seq_id)
        if seq is None:
            return None
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.block_manager.deallocate(seq)
        seq.finish(SequenceStatus.FINISHED_ABORTED)
        self._forget(seq)
        return seq

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def stats(self) -> SchedulerStats:
        bm = self.block_manager
        return SchedulerStats(
            num_running=len(self.running), num_waiting=len(self.waiting),
            num_blocks_total=bm.num_blocks, num_blocks_used=bm.num_used_blocks,
            prefix_cache_queries=bm.prefix_cache_queries, prefix_cache_hits=bm.prefix_cache_hits,
            num_preemptions=self.num_preemptions, num_prompt_tokens=self.num_prompt_tokens,
            num_generation_tokens=self.num_generation_tokens)

    # -- one step ---------------------------------------------------------------------------------
    def schedule(self) -> Batch | None:
        """Pick this step's work and reserve its KV blocks; None when there is nothing to run."""
        bm = self.block_manager
        budget = self.config.max_num_batched_tokens
        decodes: list[ScheduledSeq] = []
        prefills: list[ScheduledSeq] = []
        num_preempted = self.num_preemptions

        def emit(seq: Sequence, num_tokens: int) -> None:
            start = seq.num_computed_tokens
            row = ScheduledSeq(seq, start, num_tokens, start + num_tokens == seq.num_tokens)
            (decodes if num_tokens == 1 and row.sample else prefills).append(row)

        # 1. Decodes, oldest first. The newest running sequence is the victim; the running list is
        # sorted, so victims come from its tail and are never rows already scheduled this step.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.num_uncomputed_tokens == 1:
                while not bm.can_allocate(seq, 1):
                    victim = self.running.pop()
                    self._preempt(victim)
                    if victim is seq:
                        break
                else:
                    bm.allocate(seq, 1)
                    emit(seq, 1)
                    budget -= 1
            i += 1

        # 2. Partially prefilled sequences, oldest first. Short of blocks, a chunk shrinks to what
        # fits and admission pauses (blocks come back as the scheduled decodes finish). So at most
        # one partial prefill exists in practice; should two meet with nothing fitting, the newer
        # ones are preempted, or they could wedge each other.
        pending = [seq for seq in self.running if seq.num_uncomputed_tokens > 1]
        is_blocked = False
        j = 0
        while j < len(pending) and budget > 0:
            seq = pending[j]
            while bm.num_allocatable_tokens(seq) == 0 and len(pending) > j + 1:
                victim = pending.pop()
                self.running.remove(victim)
                self._preempt(victim)
            wanted = min(seq.num_uncomputed_tokens, budget)
            n = min(wanted, bm.num_allocatable_tokens(seq))
            if n < wanted:
                is_blocked = True
            if n == 0:
                break
            bm.allocate(seq, n)
            emit(seq, n)
            budget -= n
            j += 1

        # 3. Admit waiting sequences, first come first served: the head blocks the queue.
        if self.num_preemptions == num_preempted and not is_blocked:
            while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
                seq = self.waiting[0]
                num_cached = bm.match_prefix(seq)
                n = seq.num_tokens - num_cached
                if n > budget:
                    if not self.config.enable_chunked_prefill:
                        break
                    n = budget
                if not bm.can_allocate(seq, n):
                    break
                self.waiting.popleft()
                bm.allocate(seq, n)
                assert seq.num_computed_tokens == num_cached, (seq, num_cached)
                seq.status = SequenceStatus.RUNNING
                bisect.insort(self.running, seq, key=self._rank_of)
                emit(seq, n)
                budget -= n

        rows = decodes + prefills
        if not rows:
            return None
        assert len(rows) <= self.config.max_num_seqs
        return Batch(rows, self.config.max_num_batched_tokens - budget, len(decodes))

    def update(self, batch: Batch, sampled_token_ids: list[int | None]) -> list[Sequence]:
        """Apply a step's results (one id per row, None where sample is False); returns the
        sequences that finished this step, their blocks already freed."""
        assert len(sampled_token_ids) == len(batch.seqs), (len(sampled_token_ids), len(batch.seqs))
        bm = self.block_manager
        finished: list[Sequence] = []
        for row, token_id in zip(batch.seqs, sampled_token_ids):
            seq = row.seq
            if seq.is_finished:  # aborted after schedule(): nothing left to update
                continue
            assert seq.num_computed_tokens == row.start, (seq, row)
            seq.num_computed_tokens = row.end
            self.num_prompt_tokens += max(0, min(row.end, seq.num_prompt_tokens) - row.start)
            bm.register_computed(seq)
            if not row.sample:
                assert token_id is None, (seq, token_id)
                continue
            assert token_id is not None, seq
            seq.append_token(token_id)
            self.num_generation_tokens += 1
            status = self._stop_status(seq, token_id)
            if status is not None:
                seq.finish(status, token_id if status is SequenceStatus.FINISHED_STOPPED else None)
                bm.deallocate(seq)
                self._forget(seq)
                finished.append(seq)
        if finished:
            self.running = [seq for seq in self.running if not seq.is_finished]
        return finished

    # -- helpers ----------------------------------------------------------------------------------
    def _stop_status(self, seq: Sequence, token_id: int) -> SequenceStatus | None:
        params = seq.params
        if seq.num_output_tokens >= params.min_tokens and (
                token_id in params.stop_token_ids
                or (not params.ignore_eos and token_id in self.eos_token_ids)):
            return SequenceStatus.FINISHED_STOPPED
        if params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens:
            return SequenceStatus.FINISHED_LENGTH
        if seq.num_tokens >= self.max_seq_len:
            return SequenceStatus.FINISHED_LENGTH
        return None

    def _preempt(self, seq: Sequence) -> None:
        """Free seq's blocks and queue it again at its FCFS place; its outputs are re-prefilled."""
        self.block_manager.deallocate(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        # NOTE: this keeps `waiting` sorted by rank: victims go newest first, and nothing newer than
        # a queued sequence is admitted before it.
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _rank_of(self, seq: Sequence) -> int:
        return self._rank[seq.seq_id]

    def _forget(self, seq: Sequence) -> None:
        del self._live[seq.seq_id]
        del self._rank[seq.seq_id]
