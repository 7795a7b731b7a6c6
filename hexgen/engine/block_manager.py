"""Paged KV-cache bookkeeping of one replica (no torch): fixed-size blocks handed out to sequences.

Every rank of a replica holds a pool of `num_blocks` blocks of `block_size` token slots for its own
layers and heads; block ids mean the same thing on every rank, so the driver's block tables are the
only allocation state in the replica.
"""

from __future__ import annotations


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold num_tokens tokens."""
    return -(-num_tokens // block_size)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: block 0 is handed out first

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def extra_blocks(self, table: list[int], num_tokens: int) -> int:
        """Blocks `table` still lacks to hold num_tokens tokens."""
        return max(0, blocks_for(num_tokens, self.block_size) - len(table))

    def can_grow(self, table: list[int], num_tokens: int, reserve: int = 0) -> bool:
        """Whether `table` can grow to num_tokens tokens and still leave `reserve` blocks free."""
        return self.extra_blocks(table, num_tokens) + reserve <= len(self._free)

    def grow(self, table: list[int], num_tokens: int) -> None:
        """Append blocks to `table` (in place) until it holds num_tokens tokens."""
        extra = self.extra_blocks(table, num_tokens)
        if extra > len(self._free):
            raise RuntimeError(f"{extra} blocks needed, {len(self._free)} free")
        for _ in range(extra):
            table.append(self._free.pop())

    def release(self, table: list[int]) -> None:
        """Give every block of `table` back and empty it."""
        self._free.extend(reversed(table))
        table.clear()
