"""Paged KV-cache bookkeeping of one replica (no torch): fixed-size blocks handed out to sequences, and the
prefix cache that lets sequences share the full blocks of a common prefix.

Every rank of a replica holds a pool of `num_blocks` blocks of `block_size` token slots for its own
layers and heads; block ids mean the same thing on every rank, so the driver's block tables are the
only allocation state in the replica.

Prefix cache: once a full block's keys and values are computed, the scheduler registers it under the key
(key of the block before it, its tokens); the key chain names the whole prefix up to that block. A new (or
resumed) sequence takes the longest run of registered blocks that matches its tokens and computes only the
rest. Shared blocks are full, so no sequence writes them again. A block nobody holds keeps its contents and
its key ("evictable", counted as free) until the pool needs it: then the least recently released goes first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

BlockKey = tuple[int, tuple[int, ...]]  # (hash of the previous block's key, or -1 for the first; its tokens)


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold num_tokens tokens."""
    return -(-num_tokens // block_size)


def block_keys(tokens: Sequence[int], block_size: int, num_blocks: int, first: int = 0,
               previous: BlockKey | None = None) -> list[BlockKey]:
    """Keys of blocks [first, num_blocks) of `tokens`, chained from `previous` (the key of block first - 1)."""
    keys = []
    for b in range(first, num_blocks):
        parent = -1 if previous is None else hash(previous)
        previous = (parent, tuple(tokens[b * block_size:(b + 1) * block_size]))
        keys.append(previous)
    return keys


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack of blocks with no key: block 0 first
        self._refs = [0] * num_blocks  # sequences holding each block
        self._key_of: dict[int, BlockKey] = {}  # registered blocks
        self._block_of: dict[BlockKey, int] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # registered, held by nobody; oldest first

    @property
    def num_free(self) -> int:
        """Blocks a sequence can be given: never used, or only holding an evictable cached prefix."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Free blocks that still hold a registered prefix."""
        return len(self._evictable)

    def extra_blocks(self, table: list[int], num_tokens: int) -> int:
        """Blocks `table` still lacks to hold num_tokens tokens."""
        return max(0, blocks_for(num_tokens, self.block_size) - len(table))

    def can_grow(self, table: list[int], num_tokens: int, reserve: int = 0) -> bool:
        """Whether `table` can grow to num_tokens tokens and still leave `reserve` blocks free."""
        return self.extra_blocks(table, num_tokens) + reserve <= self.num_free

    def grow(self, table: list[int], num_tokens: int) -> None:
        """Append blocks to `table` (in place) until it holds num_tokens tokens."""
        extra = self.extra_blocks(table, num_tokens)
        if extra > self.num_free:
            raise RuntimeError(f"{extra} blocks needed, {self.num_free} free")
        for _ in range(extra):
            table.append(self._allocate())

    def _allocate(self) -> int:
        if self._free:
            block = self._free.pop()
        else:  # evict the least recently released cached block
            block, _ = self._evictable.popitem(last=False)
            del self._block_of[self._key_of.pop(block)]
        self._refs[block] = 1
        return block

    def release(self, table: list[int]) -> None:
        """Give every block of `table` back and empty it; registered blocks stay cached until needed."""
        for block in reversed(table):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._key_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)
        table.clear()

    def match(self, keys: list[BlockKey]) -> list[int]:
        """The registered blocks of the longest prefix of `keys` (not taken yet: see `take`)."""
        blocks = []
        for key in keys:
            block = self._block_of.get(key)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def can_take_and_grow(self, cached: list[int], num_tokens: int, reserve: int = 0) -> bool:
        """Whether a sequence can take the matched blocks `cached`, grow to num_tokens tokens, and leave
        `reserve` blocks free (matched blocks nobody holds stop being free once taken)."""
        idle = sum(1 for block in cached if self._refs[block] == 0)
        return self.extra_blocks(cached, num_tokens) + reserve + idle <= self.num_free

    def take(self, cached: list[int]) -> list[int]:
        """Hold the matched blocks (one more sequence refers to each); returns a new block table of them."""
        for block in cached:
            if self._refs[block] == 0:
                del self._evictable[block]
            self._refs[block] += 1
        return list(cached)

    def register(self, block: int, key: BlockKey) -> None:
        """Record that `block` holds the computed full block named `key`. A key already registered (the same
        prefix computed twice at once) keeps its block; this one stays private and is freed as usual."""
        if key not in self._block_of and block not in self._key_of:
            self._block_of[key] = block
            self._key_of[block] = key
