"""Paged KV blocks with reference counts, and a prefix cache keyed by chained block hashes."""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from engine.multimodal import block_image_keys
from engine.sequence import Sequence


def hash_block(parent_hash: bytes, token_ids: list[int], image_keys: bytes = b"") -> bytes:
    """Chained hash of one full block: it names the whole prefix, not only this block's tokens.

    sha256 rather than Python's hash(): a crafted collision would hand one user another's KV.
    """
    return hashlib.sha256(parent_hash + array("q", token_ids).tobytes() + image_keys).digest()


class BlockManager:
    """Owns which KV blocks hold which sequence's tokens; the model runner owns the tensors.

    A block is in exactly one of three states:
      used         ref_count > 0, listed in the block tables of ref_count live sequences;
      cached-free  ref_count == 0 but its hash is still in the table: a later sequence with the same
                   prefix revives it; evicted least recently freed first when a fresh block is needed;
      free         ref_count == 0, no hash: handed out before any cached-free block is evicted.
    Only FULL blocks whose KV has been written (see `register_computed`) are hashed.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool):
        assert num_blocks > 0 and block_size > 0, (num_blocks, block_size)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts: list[int] = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self._hash_to_block: dict[bytes, int] = {}
        # Popped from the end; reversed so that block 0 goes out first (tidy, deterministic tables).
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._cached_free: OrderedDict[int, None] = OrderedDict()  # LRU first
        self._num_registered: dict[str, int] = {}  # seq_id -> leading table blocks already hashed
        self.prefix_cache_queries = 0  # tokens looked up at first allocations
        self.prefix_cache_hits = 0     # of those, tokens served from the cache

    # -- counts -----------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks a fresh allocation may take (free + cached-free)."""
        return len(self._free) + len(self._cached_free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_free_blocks(self) -> int:
        return len(self._cached_free)

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- prefix cache lookups ---------------------------------------------------------------------
    def _ensure_block_hashes(self, seq: Sequence, num_full_blocks: int) -> None:
        hashes, bs, token_ids = seq.block_hashes, self.block_size, seq.all_token_ids
        while len(hashes) < num_full_blocks:
            i = len(hashes)
            # a block over image placeholders is named by the images too (their ids are all the same token)
            keys = block_image_keys(seq.images, i * bs, (i + 1) * bs) if seq.images else b""
            hashes.append(hash_block(hashes[-1] if i else b"", token_ids[i * bs:(i + 1) * bs], keys))

    def _match_prefix_blocks(self, seq: Sequence) -> list[int]:
        """Cached blocks holding the longest prefix of seq, leaving at least one token to compute."""
        if not self.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return []  # prompt logprobs need every prompt position computed, so no cache hits
        # NOTE: never the whole sequence: the last token must be computed to give logits to sample.
        max_blocks = (seq.num_tokens - 1) // self.block_size
        self._ensure_block_hashes(seq, max_blocks)
        hit: list[int] = []
        for h in seq.block_hashes[:max_blocks]:
            block_id = self._hash_to_block.get(h)
            if block_id is None:
                break
            hit.append(block_id)
        return hit

    def match_prefix(self, seq: Sequence) -> int:
        """Tokens a first allocation of seq would take from the prefix cache (no side effects)."""
        return len(self._match_prefix_blocks(seq)) * self.block_size

    # -- allocation -------------------------------------------------------------------------------
    def _plan(self, seq: Sequence, num_new_tokens: int) -> tuple[list[int], int, int]:
        """(prefix-cache hit blocks, computed tokens once they are in, fresh blocks needed)."""
        if seq.block_table:  # the common case, every decode step: no lookup
            num_computed, hit = seq.num_computed_tokens, []
        else:
            hit = self._match_prefix_blocks(seq)
            num_computed = len(hit) * self.block_size
        num_have = len(seq.block_table) + len(hit)
        return hit, num_computed, max(0, -(-(num_computed + num_new_tokens) // self.block_size) - num_have)

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Whether `allocate(seq, num_new_tokens)` would succeed now.

        On a first allocation (empty block table) num_new_tokens counts from the prefix-cache hit
        that `match_prefix` reports.
        """
        hit, _, num_fresh = self._plan(seq, num_new_tokens)
        num_revived = sum(1 for b in hit if self.ref_counts[b] == 0)  # they leave the free pool too
        return num_fresh + num_revived <= len(self._free) + len(self._cached_free)

    def num_allocatable_tokens(self, seq: Sequence) -> int:
        """How many new tokens a seq that already holds blocks could be given right now."""
        assert seq.block_table, "only for a sequence that already holds blocks"
        slack = len(seq.block_table) * self.block_size - seq.num_computed_tokens
        return slack + self.num_free_blocks * self.block_size

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grow seq.block_table to cover seq.num_computed_tokens + num_new_tokens.

        On a first allocation the prefix cache is consulted first: hit blocks are shared (or revived
        from cached-free) and seq.num_computed_tokens / num_cached_tokens are set to the hit length.
        """
        assert num_new_tokens > 0, num_new_tokens
        hit, num_computed, num_fresh = self._plan(seq, num_new_tokens)
        num_revived = sum(1 for b in hit if self.ref_counts[b] == 0)
        if num_fresh + num_revived > self.num_free_blocks:
            raise RuntimeError(f"out of KV blocks for {seq!r}: call can_allocate first")
        if not seq.block_table:
            assert seq.num_computed_tokens == 0, seq
            for block_id in hit:  # revive first, so fresh blocks below cannot evict them
                if self.ref_counts[block_id] == 0:
                    del self._cached_free[block_id]
                self.ref_counts[block_id] += 1
            seq.block_table.extend(hit)
            seq.num_computed_tokens = seq.num_cached_tokens = num_computed
            self._num_registered[seq.seq_id] = len(hit)
            if self.enable_prefix_caching:
                self.prefix_cache_queries += seq.num_tokens
                self.prefix_cache_hits += num_computed
        for _ in range(num_fresh):
            seq.block_table.append(self._take_fresh_block())

    def _take_fresh_block(self) -> int:
        if self._free:
            block_id = self._free.pop()
        else:  # evict the least recently freed cached block
            block_id, _ = self._cached_free.popitem(last=False)
            del self._hash_to_block[self.block_hash[block_id]]
            self.block_hash[block_id] = None
        assert self.ref_counts[block_id] == 0, block_id
        self.ref_counts[block_id] = 1
        return block_id

    def register_computed(self, seq: Sequence) -> None:
        """Make seq's full, computed blocks findable by later sequences (call once KV is written)."""
        if not self.enable_prefix_caching:
            return
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        start = self._num_registered.get(seq.seq_id, 0)
        if num_full <= start:
            return
        self._ensure_block_hashes(seq, num_full)
        for i in range(start, num_full):
            block_id, h = seq.block_table[i], seq.block_hashes[i]
            # A duplicate (same prefix computed concurrently, or a last block the cache could not
            # serve) stays unhashed: the first copy keeps serving, this one is plainly freed later.
            if self.block_hash[block_id] is None and h not in self._hash_to_block:
                self.block_hash[block_id] = h
                self._hash_to_block[h] = block_id
        self._num_registered[seq.seq_id] = num_full

    def deallocate(self, seq: Sequence) -> None:
        """Drop seq's references; blocks nobody uses any more become free or cached-free."""
        # Reversed, so a sequence's last blocks (whose prefixes are longest, least likely to be
        # shared) are evicted before its first ones.
        for block_id in reversed(seq.block_table):
            self.ref_counts[block_id] -= 1
            assert self.ref_counts[block_id] >= 0, block_id
            if self.ref_counts[block_id] == 0:
                if self.block_hash[block_id] is not None:
                    self._cached_free[block_id] = None
                else:
                    self._free.append(block_id)
        # NOTE: a new list, not clear(): the runner's staged rows (engine.attention.BlockTableRows) know a
        # table by its list object and copy only what was appended since
        seq.block_table = []
        self._num_registered.pop(seq.seq_id, None)
