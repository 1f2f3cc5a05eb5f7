"""Key/value caches: one preallocated cache per batch, and an LRU of channels' caches across turns.

`BatchKV` is what the model writes into while a batch is generated. Every row's tokens are
right-aligned to one column, so a row is one contiguous run of columns and decoding appends the same
column to every row. The buffers are allocated once per batch at their final size (prompt plus
`max_new_tokens`), so a decode step writes one column in place instead of concatenating the whole cache
as `DynamicCache` does. A forward pass may cover only a slice of the rows (a prefill group).

`ChannelKV` keeps, per channel/persona/adapter version, the ids of the last prompt plus reply and their
keys and values. The next turn's prompt usually extends those ids (the renderer's prefix stability), so
only the new tokens need a prefill. The LRU holds entries up to a byte budget.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache


class BatchKV(Cache):
    """A `[rows, kv_heads, capacity, head_dim]` key and value buffer per layer, filled column by column.

    A transformers `Cache` that keeps its own buffers instead of per-layer cache objects: it implements
    what the attention layers and mask helpers call (`update`, `get_seq_length`, `get_mask_sizes`); the
    engine gives masks and positions explicitly. Anything else transformers asks of a cache finds the
    base class with no layers and fails, rather than a duck-typed object silently missing a method.
    """

    def __init__(self, rows: int, capacity: int, *, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__(layers=[])
        self.rows = rows
        self.capacity = capacity
        self.device = device
        self.dtype = dtype
        self.keys: list[torch.Tensor | None] = []
        self.values: list[torch.Tensor | None] = []
        self.active: slice = slice(None)  # rows the next forward covers
        self.start = 0  # first column the next forward writes

    def _layer(self, layer: int, heads: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        while len(self.keys) <= layer:
            self.keys.append(None)
            self.values.append(None)
        k = self.keys[layer]
        if k is None:
            shape = (self.rows, heads, self.capacity, dim)
            k = torch.zeros(shape, device=self.device, dtype=self.dtype)
            self.keys[layer] = k
            self.values[layer] = torch.zeros(shape, device=self.device, dtype=self.dtype)
        v = self.values[layer]
        assert v is not None
        return k, v

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this forward's keys/values at `start` and return every column up to them (views)."""
        k, v = self._layer(layer_idx, key_states.shape[1], key_states.shape[3])
        end = self.start + key_states.shape[2]
        k[self.active, :, self.start : end] = key_states
        v[self.active, :, self.start : end] = value_states
        return k[self.active, :, :end], v[self.active, :, :end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.start

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        """(kv length, kv offset) of the next forward: every column up to the ones it writes."""
        return self.start + query_length, 0

    def load_row(self, row: int, column: int, entry: ChannelKV, length: int) -> None:
        """Copy the first `length` cached columns of `entry` into `row`, starting at `column`."""
        for layer, (ek, ev) in enumerate(zip(entry.keys, entry.values, strict=True)):
            k, v = self._layer(layer, ek.shape[0], ek.shape[2])
            k[row, :, column : column + length] = ek[:, :length]
            v[row, :, column : column + length] = ev[:, :length]

    def extract_row(self, row: int, first: int, end: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Copies of one row's columns `[first, end)` in every layer (for the channel cache)."""
        keys = [k[row, :, first:end].clone() for k in self.keys if k is not None]
        values = [v[row, :, first:end].clone() for v in self.values if v is not None]
        return keys, values

    def keep_rows(self, index: torch.Tensor) -> None:
        """Compact the batch to the rows in `index` (finished rows leave)."""
        self.keys = [None if k is None else k.index_select(0, index) for k in self.keys]
        self.values = [None if v is None else v.index_select(0, index) for v in self.values]
        self.rows = int(index.numel())

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.keys + self.values if t is not None)


@dataclass
class ChannelKV:
    """The cached keys/values of one channel's token ids, `[kv_heads, len(ids), head_dim]` per layer."""

    key: str
    ids: list[int]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.keys) + sum(t.nbytes for t in self.values)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class KVCacheLRU:
    """Channels' caches, least recently used evicted first, within `budget_bytes` (0 turns it off)."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[str, ChannelKV] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def take(self, key: str) -> ChannelKV | None:
        """Remove and return the entry for `key`; the batch puts back a longer one when it is done."""
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is not None:
                self._bytes -= entry.nbytes
            return entry

    def put(self, entry: ChannelKV) -> None:
        if self.budget_bytes <= 0 or entry.nbytes > self.budget_bytes:
            return
        with self._lock:
            old = self._entries.pop(entry.key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._entries[entry.key] = entry
            self._bytes += entry.nbytes
            while self._bytes > self.budget_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes

    def drop_matching(self, predicate: Any) -> int:
        """Forget entries whose key matches (an adapter was unloaded); returns how many."""
        with self._lock:
            doomed = [k for k in self._entries if predicate(k)]
            for k in doomed:
                self._bytes -= self._entries.pop(k).nbytes
            return len(doomed)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0
