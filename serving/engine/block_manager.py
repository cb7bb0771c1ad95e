"""Paged KV-cache blocks: reference counts and prefix caching.

The cache is `num_blocks` fixed-size blocks of `block_size` token slots. A sequence's block table lists its
blocks in order. With prefix caching, every full block whose keys/values have been computed is registered
under a chained hash (its tokens and the hash of the block before it), so a later sequence starting with
the same tokens reuses the block instead of recomputing it; shared blocks are counted by reference and are
never written (only full blocks are shared, and writes only go past a sequence's computed tokens).

A block whose count drops to 0 returns to the free list but keeps its content and hash until it is handed
out again: free blocks are evicted least recently freed first, blocks holding no cached prefix before any.
"""
from __future__ import annotations

from collections import OrderedDict

from serving.engine.sequence import Sequence

_ROOT_HASH = 0x5EED


class Block:
    __slots__ = ("block_id", "hash", "ref_count", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        # The block's tokens, kept to rule out hash collisions on lookup.
        self.token_ids: tuple[int, ...] | None = None


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[int, int] = {}           # chained hash -> block id
        # Counted in tokens, at every admission (a re-admission after preemption counts again).
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def admit(self, seq: Sequence, token_budget: int) -> int:
        """Give a waiting sequence its cached prefix and blocks for up to `token_budget` new tokens.

        Returns the number of new tokens to compute this step, or 0 (and changes nothing) when the free
        blocks do not suffice.
        """
        cached = self._lookup(seq)
        num_cached = len(cached) * self.block_size
        num_new = min(seq.num_tokens - num_cached, token_budget)
        num_revived = sum(1 for b in cached if self.blocks[b].ref_count == 0)
        num_fresh = self.blocks_needed(num_cached + num_new) - len(cached)
        if num_revived + num_fresh > len(self._free):
            return 0
        # Revive the hits before taking fresh blocks, so taking cannot evict a hit.
        for block_id in cached:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1
        seq.block_table = cached
        seq.num_computed_tokens = num_cached
        seq.num_registered_blocks = len(cached)
        self._take_fresh(seq, num_fresh)
        if self.enable_prefix_caching:
            self.prefix_cache_queries += seq.num_tokens
            self.prefix_cache_hits += num_cached
        return num_new

    def grow(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Make room for `num_new_tokens` more tokens of a running sequence; False if out of blocks."""
        need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        if need > len(self._free):
            return False
        self._take_fresh(seq, need)
        return True

    def free(self, seq: Sequence) -> None:
        # Tail first: a sequence's last blocks are the least likely to be shared, so they go first.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
                if block.hash is None:
                    self._free.move_to_end(block_id, last=False)
        seq.block_table = []
        seq.num_registered_blocks = 0

    def register(self, seq: Sequence) -> None:
        """Offer the sequence's newly filled and computed blocks to the prefix cache."""
        num_full = seq.num_computed_tokens // self.block_size
        if not self.enable_prefix_caching or num_full <= seq.num_registered_blocks:
            return
        self._extend_hashes(seq, num_full)
        bs = self.block_size
        for i in range(seq.num_registered_blocks, num_full):
            block_hash = seq.block_hashes[i]
            block = self.blocks[seq.block_table[i]]
            # A block computed twice (two sequences prefilled together) is registered once.
            if block.hash is None and block_hash not in self._cached:
                block.hash = block_hash
                block.token_ids = tuple(seq.token_ids[i * bs:(i + 1) * bs])
                self._cached[block_hash] = block.block_id
        seq.num_registered_blocks = num_full

    def _lookup(self, seq: Sequence) -> list[int]:
        if not self.enable_prefix_caching or seq.request.scoring_prompt:
            # Scoring the prompt needs every prompt token's hidden state: a cached block has none. The other
            # completions of the request compute theirs too, so none finishes its prefill before the first.
            return []
        # The last token is always computed: its logits give the next token.
        num_candidates = (seq.num_tokens - 1) // self.block_size
        self._extend_hashes(seq, num_candidates)
        bs = self.block_size
        hits = []
        for i in range(num_candidates):
            block_id = self._cached.get(seq.block_hashes[i])
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            hits.append(block_id)
        return hits

    def _extend_hashes(self, seq: Sequence, num_blocks: int) -> None:
        hashes, bs, tokens = seq.block_hashes, self.block_size, seq.token_ids
        prev = hashes[-1] if hashes else _ROOT_HASH
        for i in range(len(hashes), num_blocks):
            prev = hash((prev, *tokens[i * bs:(i + 1) * bs]))
            hashes.append(prev)

    def _take_fresh(self, seq: Sequence, count: int) -> None:
        for _ in range(count):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            if block.hash is not None:
                del self._cached[block.hash]
                block.hash = block.token_ids = None
            block.ref_count = 1
            seq.block_table.append(block_id)
