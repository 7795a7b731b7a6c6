"""Per-sequence key/value cache of one rank: its stage's layers and its share of the key/value heads.

Each sequence owns one growable buffer [layers, 2, kv_heads_local, capacity, head_dim]; capacity
doubles when full, so memory follows the tokens actually held and appends cost O(1) amortised.
"""

from __future__ import annotations

import torch

MIN_CAPACITY_TOKENS = 64


class KVCache:
    def __init__(self, num_layers: int, kv_heads_local: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.num_layers = num_layers
        self.kv_heads_local = kv_heads_local
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = device
        self._buffers: dict[int, torch.Tensor] = {}

    def __contains__(self, slot: int) -> bool:
        return slot in self._buffers

    @property
    def num_sequences(self) -> int:
        return len(self._buffers)

    def free(self, slot: int) -> None:
        self._buffers.pop(slot, None)

    def reserve(self, slot: int, length: int) -> None:
        """Make room for `length` tokens of `slot`, keeping what it already holds."""
        old = self._buffers.get(slot)
        capacity = 0 if old is None else old.shape[3]
        if length <= capacity:
            return
        new_capacity = max(MIN_CAPACITY_TOKENS, capacity * 2, length)
        shape = (self.num_layers, 2, self.kv_heads_local, new_capacity, self.head_dim)
        new = torch.empty(shape, dtype=self.dtype, device=self.device)
        if old is not None:
            new[:, :, :, :capacity].copy_(old)
        self._buffers[slot] = new

    def append(
        self, layer: int, slot: int, start: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [n, kv_heads_local, head_dim] at positions [start, start+n); return views of all
        keys and values [kv_heads_local, start+n, head_dim] of that layer."""
        buf = self._buffers[slot][layer]
        end = start + k.shape[0]
        buf[0, :, start:end].copy_(k.transpose(0, 1))
        buf[1, :, start:end].copy_(v.transpose(0, 1))
        return buf[0, :, :end], buf[1, :, :end]

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())
