"""Paged KV-cache accounting: fixed-size blocks, block tables, reference counts, prefix caching.

Pure Python (no torch): it decides *which* slots a sequence's KV goes to; the model runner owns the
tensor. Verbs come in check/act pairs (``can_allocate``/``allocate``) so that the scheduler can
decide to preempt before anything changes.

Prefix caching: once a block is full and its KV computed, it is registered under a chained hash of
(parent block's hash, its token ids). A later sequence whose prompt starts with the same tokens
reuses those blocks (reference count + 1) instead of recomputing them. The stored key is compared on
every hit, so a hash collision can never serve another prompt's KV. Freed blocks keep their hash
and stay reusable until the allocator hands them out again: the free list doubles as the LRU list.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .sequence import Sequence

BlockKey = tuple[int | None, tuple[int, ...]]   # (parent block hash, token ids of the block)
HashFn = Callable[[int | None, tuple[int, ...]], int]


def hash_block_tokens(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    """Chained block hash: equal only if every block up to this one holds the same tokens."""
    return hash((parent_hash, token_ids))


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None    # set while registered in the prefix cache
    key: BlockKey | None = None      # what the hash stands for, re-checked on every hit


@dataclass(frozen=True)
class PrefixHit:
    """Cached full blocks that cover the start of a sequence (found by ``lookup_prefix``)."""
    block_ids: tuple[int, ...] = ()
    block_size: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.block_ids) * self.block_size


NO_HIT = PrefixHit()


class BlockManager:
    """Owns the pool of ``num_blocks`` KV blocks of ``block_size`` tokens each.

    Invariants: a block is in the free list iff its ``ref_count`` is 0; a block is in the prefix
    cache iff its ``block_hash`` is set. Free blocks that hold no cached prefix are handed out
    first; cached ones are evicted least-recently-freed first. ``hash_fn`` is injectable so that
    tests can force collisions.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 hash_fn: HashFn = hash_block_tokens):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.hash_fn = hash_fn
        self.prefix_queries = 0     # tokens of admitted sequences looked up in the prefix cache
        self.prefix_hits = 0        # of those, tokens served from the cache
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # front = next out
        self._cached: dict[int, int] = {}   # block hash -> block id

    # -- accounting --------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now, including evictable cached ones."""
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by live sequences (vLLM's ``kv_cache_usage_perc``)."""
        return 1.0 - len(self._free) / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def free_block_ids(self) -> list[int]:
        """The free list in hand-out order (front first)."""
        return list(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- prefix cache ------------------------------------------------------------------------------
    def lookup_prefix(self, seq: Sequence) -> PrefixHit:
        """Check: the longest run of cached blocks matching the start of ``seq`` (no state change).

        Hits are capped at ``num_tokens - 1`` tokens: the last token must be computed to get logits,
        and computing it must never write into a block that other sequences share.
        """
        if not self.enable_prefix_caching:
            return NO_HIT
        max_blocks = (seq.num_tokens - 1) // self.block_size
        hashes = self._block_hashes(seq, max_blocks)
        block_ids: list[int] = []
        parent: int | None = None
        for i, block_hash in enumerate(hashes[:max_blocks]):
            block_id = self._cached.get(block_hash)
            if block_id is None or self.blocks[block_id].key != (parent, self._block_tokens(seq, i)):
                break
            block_ids.append(block_id)
            parent = block_hash
        return PrefixHit(tuple(block_ids), self.block_size)

    def cache_blocks(self, seq: Sequence, num_computed_before: int) -> None:
        """Register the blocks that became full and computed since ``num_computed_before``."""
        if not self.enable_prefix_caching:
            return
        first, end = num_computed_before // self.block_size, seq.num_computed_tokens // self.block_size
        if first == end:
            return      # most decode steps: no block became full
        hashes = self._block_hashes(seq, end)
        for i in range(first, end):
            block = self.blocks[seq.block_table[i]]
            if block.block_hash is not None or hashes[i] in self._cached:
                continue    # already registered, or an identical block computed by another sequence
            block.block_hash = hashes[i]
            block.key = (hashes[i - 1] if i else None, self._block_tokens(seq, i))
            self._cached[hashes[i]] = block.block_id

    def _block_hashes(self, seq: Sequence, num_blocks: int) -> list[int]:
        hashes = seq.block_hashes
        for i in range(len(hashes), min(num_blocks, seq.num_tokens // self.block_size)):
            hashes.append(self.hash_fn(hashes[i - 1] if i else None, self._block_tokens(seq, i)))
        return hashes

    def _block_tokens(self, seq: Sequence, index: int) -> tuple[int, ...]:
        return tuple(seq.token_ids[index * self.block_size:(index + 1) * self.block_size])

    # -- allocation --------------------------------------------------------------------------------
    def num_blocks_needed(self, seq: Sequence, num_new_tokens: int, prefix: PrefixHit = NO_HIT) -> int:
        """Fresh blocks ``allocate`` would take to cover positions < computed + num_new_tokens."""
        num_computed = prefix.num_tokens if prefix.block_ids else seq.num_computed_tokens
        have = len(seq.block_table) + len(prefix.block_ids)
        return max(0, self.blocks_for(num_computed + num_new_tokens) - have)

    def can_allocate(self, seq: Sequence, num_new_tokens: int, prefix: PrefixHit = NO_HIT,
                     num_reserved: int = 0) -> bool:
        """Check: whether ``allocate`` would succeed while leaving ``num_reserved`` blocks free."""
        # Cached blocks we are about to reuse are in the free list now but will not be afterwards.
        num_revived = sum(1 for b in prefix.block_ids if self.blocks[b].ref_count == 0)
        available = self.num_free_blocks - num_revived - num_reserved
        return self.num_blocks_needed(seq, num_new_tokens, prefix) <= available

    def allocate(self, seq: Sequence, num_new_tokens: int, prefix: PrefixHit | None = None) -> None:
        """Act: extend ``seq.block_table`` to cover positions < computed + ``num_new_tokens``.

        ``prefix`` is given exactly once, when a waiting sequence is admitted: its blocks are
        shared and ``seq.num_computed_tokens`` jumps past them.
        """
        if prefix is not None:
            self._admit(seq, prefix)
        needed = self.num_blocks_needed(seq, num_new_tokens)
        if needed > self.num_free_blocks:
            raise RuntimeError(f"out of KV blocks: need {needed}, have {self.num_free_blocks} "
                               "(call can_allocate first)")
        seq.block_table.extend(self._take_free_block() for _ in range(needed))

    def _admit(self, seq: Sequence, prefix: PrefixHit) -> None:
        assert not seq.block_table and seq.num_computed_tokens == 0, "prefix given twice"
        for block_id in prefix.block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1
        seq.block_table = list(prefix.block_ids)
        seq.num_computed_tokens = seq.num_cached_tokens = prefix.num_tokens
        if self.enable_prefix_caching:
            self.prefix_queries += seq.num_tokens
            self.prefix_hits += prefix.num_tokens

    def _take_free_block(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:    # evict: its KV is about to be overwritten
            del self._cached[block.block_hash]
            block.block_hash = block.key = None
        block.ref_count = 1
        return block_id

    def free(self, seq: Sequence) -> None:
        """Act: release the sequence's blocks at once; cached ones stay reusable until evicted."""
        self.free_blocks(reversed(seq.block_table))
        seq.block_table = []

    def free_blocks(self, block_ids: Iterable[int]) -> None:
        """Act: drop one reference to each block."""
        # Tail blocks are freed first, so under LRU they are evicted before the shared prefix.
        for block_id in block_ids:
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                self._free[block_id] = None
                if block.block_hash is None:    # holds nothing reusable: hand it out first
                    self._free.move_to_end(block_id, last=False)
