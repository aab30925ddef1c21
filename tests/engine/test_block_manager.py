"""BlockManager: reference counts, prefix-cache hits over computed full blocks, LRU eviction."""
import pytest

from engine.block_manager import BlockManager, hash_block
from engine.sequence import Sequence
from engine.sampling_params import SamplingParams

BS = 16


def make_seq(seq_id: str, token_ids: list[int]) -> Sequence:
    return Sequence(seq_id, token_ids, SamplingParams())


def compute(bm: BlockManager, seq: Sequence, num_tokens: int) -> None:
    """What scheduler + runner do for one step: reserve, 'write' the KV, register full blocks."""
    bm.allocate(seq, num_tokens)
    seq.num_computed_tokens += num_tokens
    bm.register_computed(seq)


def check(bm: BlockManager, live: list[Sequence]) -> None:
    """Refcounts equal table occurrences; each block exactly one of used / free / cached-free."""
    expected = [0] * bm.num_blocks
    for seq in live:
        for block_id in seq.block_table:
            expected[block_id] += 1
    assert bm.ref_counts == expected
    free, cached_free = list(bm._free), list(bm._cached_free)
    assert len(set(free)) == len(free) and not set(free) & set(cached_free)
    assert sorted(free + cached_free) == [b for b in range(bm.num_blocks) if expected[b] == 0]
    assert all(bm.block_hash[b] is None for b in free)
    assert all(bm.block_hash[b] is not None for b in cached_free)
    assert {h: b for b, h in enumerate(bm.block_hash) if h is not None} == bm._hash_to_block
    assert bm.num_used_blocks == sum(1 for r in expected if r)


def test_allocate_grows_table_and_deallocate_frees():
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    seq = make_seq("a", list(range(40)))
    assert bm.can_allocate(seq, 40)
    compute(bm, seq, 20)
    assert len(seq.block_table) == 2 and bm.num_used_blocks == 2
    compute(bm, seq, 12)          # 32 tokens: still two blocks
    assert len(seq.block_table) == 2
    compute(bm, seq, 1)
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 5
    check(bm, [seq])
    bm.deallocate(seq)
    assert seq.block_table == [] and bm.num_free_blocks == 8 and bm.num_cached_free_blocks == 0
    check(bm, [])
    assert bm.prefix_cache_queries == 0 and bm.prefix_cache_hits == 0


def test_can_allocate_refuses_beyond_free_blocks():
    bm = BlockManager(4, BS, enable_prefix_caching=False)
    a = make_seq("a", list(range(100)))
    assert bm.can_allocate(a, 64) and not bm.can_allocate(a, 65)
    with pytest.raises(RuntimeError):
        bm.allocate(a, 65)
    check(bm, [])
    compute(bm, a, 50)
    assert bm.num_allocatable_tokens(a) == 64 - 50
    assert bm.can_allocate(a, 14) and not bm.can_allocate(a, 15)


def test_prefix_hit_on_shared_prefix_sets_computed_and_counters():
    bm = BlockManager(64, BS, enable_prefix_caching=True)
    prefix = [1000 + i for i in range(200)]
    a = make_seq("a", prefix + [1, 2, 3])
    compute(bm, a, a.num_tokens)
    b = make_seq("b", prefix + [7, 8, 9, 10])
    assert bm.match_prefix(b) == 192  # 12 full blocks; the partial 13th is never hashed
    compute(bm, b, b.num_tokens - 192)
    assert b.num_cached_tokens == 192 and b.num_computed_tokens == b.num_tokens
    assert b.block_table[:12] == a.block_table[:12] and b.block_table[12] != a.block_table[12]
    assert all(bm.ref_counts[x] == 2 for x in a.block_table[:12])
    assert bm.prefix_cache_queries == a.num_tokens + b.num_tokens
    assert bm.prefix_cache_hits == 192
    check(bm, [a, b])


def test_hit_never_covers_the_whole_sequence():
    bm = BlockManager(16, BS, enable_prefix_caching=True)
    a = make_seq("a", list(range(32)))
    compute(bm, a, 32)
    same = make_seq("b", list(range(32)))
    # Both blocks are cached, but the last token must be computed to have logits to sample from.
    assert bm.match_prefix(same) == 16
    compute(bm, same, 16)
    # The recomputed last block duplicates a's: it stays unhashed rather than stealing the entry.
    assert bm.block_hash[same.block_table[1]] is None
    check(bm, [a, same])


def test_only_computed_full_blocks_are_cached():
    bm = BlockManager(16, BS, enable_prefix_caching=True)
    a = make_seq("a", list(range(60)))
    bm.allocate(a, 60)            # reserved but not yet written: nothing may be served from it
    assert bm.match_prefix(make_seq("x", list(range(60)))) == 0
    a.num_computed_tokens = 40    # a chunk of 40 written: two full blocks
    bm.register_computed(a)
    assert bm.match_prefix(make_seq("y", list(range(60)))) == 32
    a.num_computed_tokens = 60
    bm.register_computed(a)       # 3 full blocks; the 12 tokens of the 4th are never hashed
    assert bm.match_prefix(make_seq("z", list(range(70)))) == 48
    check(bm, [a])


def test_hash_is_chained_over_the_prefix():
    assert hash_block(b"", [1, 2]) == hash_block(b"", [1, 2])
    assert hash_block(b"", [1, 2]) != hash_block(hash_block(b"", [0]), [1, 2])
    bm = BlockManager(16, BS, enable_prefix_caching=True)
    a = make_seq("a", [5] * 16 + [6] * 16 + [0])
    compute(bm, a, a.num_tokens)
    # Same second block after a different first block: no hit at all.
    assert bm.match_prefix(make_seq("b", [4] * 16 + [6] * 16 + [0])) == 0
    assert bm.match_prefix(make_seq("c", [5] * 16 + [6] * 16 + [1])) == 32


def test_cached_free_block_is_revived_by_a_hit():
    bm = BlockManager(8, BS, enable_prefix_caching=True)
    a = make_seq("a", list(range(50)))
    compute(bm, a, 50)
    a_blocks = list(a.block_table)
    bm.deallocate(a)
    assert bm.num_cached_free_blocks == 3 and bm.num_free_blocks == 8
    check(bm, [])
    b = make_seq("b", list(range(49)) + [999])
    assert bm.match_prefix(b) == 48
    compute(bm, b, 2)
    assert b.block_table[:3] == a_blocks[:3] and b.num_cached_tokens == 48
    assert bm.num_cached_free_blocks == 0 and bm.num_used_blocks == 4
    check(bm, [b])


def test_can_allocate_counts_revived_blocks():
    bm = BlockManager(4, BS, enable_prefix_caching=True)
    a = make_seq("a", list(range(49)))
    compute(bm, a, 49)            # blocks 0-2 cached, block 3 partial
    bm.deallocate(a)
    long = make_seq("b", list(range(48)) + [7] * 17)   # 65 tokens: 3 cached blocks + 2 fresh = 5
    assert bm.match_prefix(long) == 48
    assert not bm.can_allocate(long, 17)   # 3 revived + 2 fresh > 4 free
    assert bm.can_allocate(long, 16)       # 3 revived + 1 fresh
    compute(bm, long, 16)
    assert bm.num_free_blocks == 0
    check(bm, [long])


def test_cached_free_blocks_are_evicted_least_recently_freed_first():
    bm = BlockManager(6, BS, enable_prefix_caching=True)
    seqs = [make_seq(name, [ord(name)] * 32) for name in "abc"]
    for seq in seqs:
        compute(bm, seq, seq.num_tokens)
    for seq in seqs:               # freed a, b, c: a's blocks are the least recently freed
        bm.deallocate(seq)
    assert bm.num_cached_free_blocks == 6 and bm.num_free_blocks == 6
    probe = {name: make_seq("p" + name, [ord(name)] * 32 + [1]) for name in "abc"}
    fresh = make_seq("d", [1] * 64)
    compute(bm, fresh, 16)         # one fresh block: a's LAST block goes first (freed in reverse)
    assert [bm.match_prefix(probe[n]) for n in "abc"] == [16, 32, 32]
    compute(bm, fresh, 16)
    assert [bm.match_prefix(probe[n]) for n in "abc"] == [0, 32, 32]
    compute(bm, fresh, 17)         # two more blocks: b's, then c is the only prefix left
    assert [bm.match_prefix(probe[n]) for n in "abc"] == [0, 0, 32]
    check(bm, [fresh])


def test_free_blocks_are_used_before_evicting_cached_ones():
    bm = BlockManager(4, BS, enable_prefix_caching=True)
    a = make_seq("a", list(range(33)))
    compute(bm, a, 33)             # 2 hashed blocks + 1 partial
    bm.deallocate(a)
    assert bm.num_cached_free_blocks == 2 and bm.num_free_blocks == 4
    b = make_seq("b", [9] * 32)
    compute(bm, b, 32)             # takes the two unhashed blocks, keeps the cache intact
    assert bm.match_prefix(make_seq("c", list(range(40)))) == 32
    check(bm, [b])


def test_prefix_caching_disabled_never_hits():
    bm = BlockManager(16, BS, enable_prefix_caching=False)
    a = make_seq("a", list(range(64)))
    compute(bm, a, 64)
    bm.deallocate(a)
    b = make_seq("b", list(range(64)))
    assert bm.match_prefix(b) == 0
    compute(bm, b, 64)
    assert b.num_cached_tokens == 0 and bm.num_cached_free_blocks == 0
    assert bm.prefix_cache_queries == 0 and bm.prefix_cache_hits == 0
    check(bm, [b])
