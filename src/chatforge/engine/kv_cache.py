"""A preallocated key/value cache: prefill once, then decode one token per step.

Keys and values of every layer live in one tensor allocated up front, so decoding
never reallocates. Each slot remembers its token's position and whether it is real
(padding is not), which is all the attention mask needs for left-padded batches,
grouped-query heads and sliding windows alike.
"""
from __future__ import annotations

from typing import Optional

import torch

from chatforge.config import ModelConfig


class KVCache:
    """Every layer's keys and values for a batch, with each slot's position and validity."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        shape = (config.n_layer, batch_size, config.kv_heads, max_len, config.dim_head)
        # never read before written: only the filled slots [:length] are handed to the attention
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.pos = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.next_pos = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.max_len = max_len
        self.length = 0  # slots filled so far (the same for every row)
        self._new = 0  # slots being written by the current forward pass
        self._views: Optional[tuple] = None  # (k, v, per-layer views of k, of v): made once per storage

    def next_position(self) -> torch.Tensor:
        """(B,) position the next real token of each row will have."""
        return self.next_pos

    def reserve(self, positions: torch.Tensor,
                attention_mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Claim slots for T new tokens; return the positions and validity of every key so far.

        The validity is None when every slot holds a real token (no padding anywhere): the
        attention then needs no mask, the cheap common case of decoding one sequence.
        """
        T = positions.shape[1]
        end = self.length + T
        if end > self.max_len:
            raise RuntimeError(f"KV cache full: {end} slots needed, {self.max_len} allocated")
        self.pos[:, self.length:end] = positions
        if attention_mask is None:
            self.valid[:, self.length:end] = True
            last = positions.max(dim=1).values + 1
        else:
            new_valid = attention_mask.bool()
            self.valid[:, self.length:end] = new_valid
            last = torch.where(new_valid, positions + 1, torch.zeros_like(positions)).max(dim=1).values
        self.next_pos = torch.maximum(self.next_pos, last)
        self._new = T
        valid = self.valid[:, :end]
        return self.pos[:, :end], (None if bool(valid.all()) else valid)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this layer's new keys/values and return all of them."""
        end = self.length + self._new
        keys, values = self._layer(layer)
        keys[:, :, self.length:end] = k
        values[:, :, self.length:end] = v
        return keys[:, :, :end], values[:, :, :end]

    def slots(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """This layer's whole key and value storage (B, KVH, slots, D) and the first slot the current pass
        writes: for a kernel that stores the new keys and values itself (chatforge.kernels' attention_step)."""
        keys, values = self._layer(layer)
        return keys, values, self.length

    def _layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer`'s (B, KVH, slots, D) views, made once per storage tensor (indexing costs a few
        microseconds, 2 per layer per decoding step)."""
        views = getattr(self, "_views", None)
        if views is None or views[0] is not self.k or views[1] is not self.v:
            views = self._views = (self.k, self.v, self.k.unbind(0), self.v.unbind(0))
        return views[2][layer], views[3][layer]

    def advance(self, T: int) -> None:
        self.length += T
        self._new = 0

    # --- changing which requests the cache holds (continuous batching) --------------------
    def select(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows, in this order (e.g. drop finished requests)."""
        self.k, self.v = self.k.index_select(1, rows), self.v.index_select(1, rows)
        self.pos, self.valid = self.pos.index_select(0, rows), self.valid.index_select(0, rows)
        self.next_pos = self.next_pos.index_select(0, rows)

    def dead_prefix(self) -> int:
        """How many leading filled slots are padding in every row: no row attends to them any more."""
        used = self.valid[:, :self.length].any(0)
        return int(used.int().argmax()) if bool(used.any()) else self.length

    def trim(self, first: int) -> None:
        """Drop slots [:first] (slots no row attends to: see dead_prefix), copying the rest to new tensors."""
        self.k = self.k[:, :, :, first:].clone()
        self.v = self.v[:, :, :, first:].clone()
        self.pos = self.pos[:, first:].clone()
        self.valid = self.valid[:, first:].clone()
        self.length -= first
        self.max_len -= first

    # --- taking tokens back (speculative decoding: engine/speculative.py) ------------------------
    def truncate(self, lengths: torch.Tensor) -> None:
        """Forget every token of row b at position lengths[b] or later (drafted tokens the model rejected):
        their slots stop being valid, the row's next token gets position lengths[b], and trailing slots no
        row uses any more are given back."""
        n = self.length
        self.valid[:, :n] &= self.pos[:, :n] < lengths[:, None]
        self.next_pos = torch.minimum(self.next_pos, lengths)
        used = self.valid[:, :n].any(0).nonzero()
        self.length = int(used[-1]) + 1 if len(used) else 0

    def compact(self) -> None:
        """Close the holes truncate() leaves when rows keep different numbers of tokens: every row's valid
        slots move, in order, to the right end of the fewest slots that hold them all."""
        n = self.length
        valid = self.valid[:, :n]
        keep = int(valid.sum(1).max()) if n else 0
        # a stable sort puts each row's invalid slots first and its valid ones after them, both in slot order
        order = valid.to(torch.int8).sort(dim=1, stable=True).indices[:, n - keep:]
        L, B, H, _, D = self.k.shape
        index = order[None, :, None, :, None].expand(L, B, H, keep, D)
        for store in (self.k, self.v):
            store[:, :, :, :keep] = store[:, :, :, :n].gather(3, index)
        self.pos[:, :keep] = self.pos[:, :n].gather(1, order)
        self.valid[:, :keep] = valid.gather(1, order)
        self.length = keep

    @classmethod
    def concat(cls, caches: list["KVCache"], max_len: int = 0) -> "KVCache":
        """One cache holding the rows of all of `caches`, right-aligned.

        A cache with fewer filled slots gets padding slots (never attended to) on its left,
        so every row's newest token sits in the same slot: how a request joins a running
        batch. `max_len` reserves room for the decode steps still to come.
        """
        length = max(c.length for c in caches)
        first = caches[0]
        n_layer, _, heads, _, dim = first.k.shape
        batch = sum(c.k.shape[1] for c in caches)
        out = cls.__new__(cls)
        out.k = first.k.new_zeros((n_layer, batch, heads, max(max_len, length), dim))
        out.v = torch.zeros_like(out.k)
        out.pos = first.pos.new_zeros((batch, out.k.shape[3]))
        out.valid = first.valid.new_zeros((batch, out.k.shape[3]))
        out.next_pos = torch.cat([c.next_pos for c in caches])
        out.max_len, out.length, out._new = out.k.shape[3], length, 0
        row = 0
        for c in caches:
            rows, start = slice(row, row + c.k.shape[1]), length - c.length
            out.k[:, rows, :, start:length] = c.k[:, :, :, :c.length]
            out.v[:, rows, :, start:length] = c.v[:, :, :, :c.length]
            out.pos[rows, start:length] = c.pos[:, :c.length]
            out.valid[rows, start:length] = c.valid[:, :c.length]
            row += c.k.shape[1]
        return out
