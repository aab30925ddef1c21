"""SchedulerStats: a snapshot of queue lengths, KV usage and cumulative counters for metrics."""
from __future__ import annotations

from dataclasses import dataclass

from engine.fast_pickle import pickled_by_fields


@pickled_by_fields
@dataclass(frozen=True, slots=True)
class SchedulerStats:
    num_running: int = 0            # sequences holding KV blocks (being prefilled or decoded)
    num_waiting: int = 0            # sequences queued, including preempted ones
    num_blocks_total: int = 0
    num_blocks_used: int = 0        # referenced by a live sequence (cached-free blocks count as free)
    # Cumulative since start (counters: the consumer takes differences for rates).
    prefix_cache_queries: int = 0   # tokens looked up in the prefix cache at first allocations
    prefix_cache_hits: int = 0      # of those, tokens served from the cache
    num_preemptions: int = 0
    num_prompt_tokens: int = 0      # prompt tokens computed (prefix-cache hits excluded)
    num_generation_tokens: int = 0  # tokens sampled

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of KV blocks in use, 0..1."""
        return self.num_blocks_used / self.num_blocks_total if self.num_blocks_total else 0.0
