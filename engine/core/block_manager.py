"""Fixed-size KV blocks: a free list, reference counts, and prefix caching by chained hashes.

A block's hash covers its tokens and the hash of the block before it, so equal hashes mean
equal prefixes (up to hash collisions, which are caught by comparing the stored tokens and the
stored hash of the block before).
Freed blocks keep their hash until they are handed out again, so a later request with the
same prefix can take them back: the free list is also the LRU eviction order.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from engine.core.request import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = ()
    # The hash of the block before it when published: with token_ids, what a hit is checked against.
    parent_hash: int | None = None


def chain_hash(parent: int | None, token_ids: tuple[int, ...]) -> int:
    # A tuple of ints hashes the same in every process (no string salting); hash(None) does
    # not before Python 3.12, so the first block chains from a constant instead.
    return hash((0 if parent is None else parent, token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[int, int] = {}  # hash -> block id
        self.prefix_hits = 0
        self.prefix_queries = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow seq's block table to hold num_tokens; False (and no change) if blocks run out."""
        needed = self.blocks_needed(seq, num_tokens)
        if needed > len(self._free):
            return False
        for _ in range(needed):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            self._evict(block)
            block.ref_count = 1
            seq.block_table.append(block_id)
        return True

    def free(self, seq: Sequence) -> None:
        # Reversed, so a sequence's tail blocks are evicted before the prefix others may share.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                self._free[block_id] = None
        seq.block_table = []

    def match_prefix(self, seq: Sequence) -> int:
        """Attach cached blocks matching seq's leading full blocks; returns the tokens they cover.

        At least one token is always left to compute, since the step that computes it produces
        the logits to sample from; a fully cached prompt therefore gives back its last block.
        """
        if not self.enable_prefix_caching or seq.block_table:
            return 0
        self._update_hashes(seq, seq.num_tokens)
        max_blocks = (seq.num_tokens - 1) // self.block_size
        matched: list[int] = []
        for i, h in enumerate(seq.block_hashes[:max_blocks]):
            block_id = self._cached.get(h)
            tokens = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            parent = seq.block_hashes[i - 1] if i else None
            # A collision is caught by the block's own tokens, and by what came before it: equal
            # tokens after another prefix (or at another position) are not the same KV.
            if block_id is None or self.blocks[block_id].token_ids != tokens \
                    or self.blocks[block_id].parent_hash != parent:
                break
            matched.append(block_id)
        for block_id in matched:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1
        seq.block_table = matched
        return len(matched) * self.block_size

    def count_prefix_lookup(self, seq: Sequence) -> None:
        """Counts an admitted sequence's prefix-cache lookup once (an admission that fails for
        lack of blocks is retried, and would otherwise count its hits again)."""
        self.prefix_queries += (seq.num_tokens - 1) // self.block_size
        self.prefix_hits += seq.num_cached_tokens // self.block_size

    def cache_computed_blocks(self, seq: Sequence) -> None:
        """Publish seq's full, computed blocks so later requests can reuse them."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        self._update_hashes(seq, seq.num_computed_tokens)
        for i, h in enumerate(seq.block_hashes[:num_full]):
            block = self.blocks[seq.block_table[i]]
            if block.hash is not None:
                continue
            if h in self._cached:
                continue  # an identical block is already published; keep that one
            block.hash = h
            block.token_ids = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            block.parent_hash = seq.block_hashes[i - 1] if i else None
            self._cached[h] = block.block_id

    def _update_hashes(self, seq: Sequence, num_tokens: int) -> None:
        bs = self.block_size
        for i in range(len(seq.block_hashes), num_tokens // bs):
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            seq.block_hashes.append(chain_hash(parent, tuple(seq.token_ids[i * bs:(i + 1) * bs])))

    def _evict(self, block: Block) -> None:
        if block.hash is not None and self._cached.get(block.hash) == block.block_id:
            del self._cached[block.hash]
        block.hash = None
        block.token_ids = ()
        block.parent_hash = None

    def reset_prefix_cache(self) -> None:
        for block in self.blocks:
            if block.ref_count == 0:
                self._evict(block)
