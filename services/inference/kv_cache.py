"""The engine's KV cache: preallocated slots, one per resident sequence, and a bounded host pool.

Each layer holds keys and values as [slots, heads, context, head_dim]. A sequence owns one slot
from admission until it finishes or is evicted; the lowest free slot is handed out first, so the
slots in use stay packed at the front and a decode step can attend over a view of the first slots
without gathering. An evicted sequence's cache goes to host memory while the host pool has room
(copied back into any free slot when it runs again), or is dropped and recomputed from its tokens.
An encoder-decoder also keeps, per slot, the cross-attention keys and values of its sequence's
encoder states. Nothing is allocated per request: memory is fixed when the model loads.
"""

from __future__ import annotations

import heapq

import torch


class KVCache:
    def __init__(self, slots: int, context: int, kv_heads: list[int], head_dim: int, dtype: torch.dtype,
                 device: torch.device, host_slots: int, source: int = 0) -> None:
        """`source`: the longest encoder input of an encoder-decoder (0: a decoder-only model)."""
        self.slots, self.context, self.host_slots = slots, context, host_slots
        self.keys = [torch.zeros(slots, h, context, head_dim, dtype=dtype, device=device) for h in kv_heads]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.cross_keys = [torch.zeros(slots, h, source, head_dim, dtype=dtype, device=device)
                           for h in kv_heads] if source else []
        self.cross_values = [torch.zeros_like(k) for k in self.cross_keys]
        self.source_lengths = torch.zeros(slots, dtype=torch.long, device=device)
        self.free = list(range(slots))
        heapq.heapify(self.free)
        self.offloaded = 0  # sequences whose cache is in host memory now
        self.pin = device.type == "cuda"

    def allocate(self) -> int | None:
        return heapq.heappop(self.free) if self.free else None

    def release(self, slot: int) -> None:
        heapq.heappush(self.free, slot)

    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> None:
        """Store per-token keys/values [T, heads, d] at (slot, position) of each token."""
        self.keys[layer][slots, :, positions] = k
        self.values[layer][slots, :, positions] = v

    def write_cross(self, slot: int, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Store one source's cross-attention keys/values, per layer [L, heads, d], in `slot`."""
        for layer, (k, v) in enumerate(layers):
            self.cross_keys[layer][slot, :, :len(k)] = k.transpose(0, 1)
            self.cross_values[layer][slot, :, :len(v)] = v.transpose(0, 1)
        self.source_lengths[slot] = len(layers[0][0])

    def offload(self, slot: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Copy a slot's first `length` positions (and its cross-attention states) to host memory and
        free the slot; None (nothing copied, slot still held) when the host pool is full and the caller
        should recompute instead."""
        if self.offloaded >= self.host_slots:
            return None
        source = int(self.source_lengths[slot])
        pairs = [(k, v, length) for k, v in zip(self.keys, self.values, strict=True)]
        pairs += [(k, v, source) for k, v in zip(self.cross_keys, self.cross_values, strict=True)]
        saved = [(k[slot, :, :n].to("cpu", copy=True), v[slot, :, :n].to("cpu", copy=True)) for k, v, n in pairs]
        if self.pin:
            saved = [(k.pin_memory(), v.pin_memory()) for k, v in saved]
        self.offloaded += 1
        self.release(slot)
        return saved

    def restore(self, slot: int, saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        targets = list(zip(self.keys, self.values, strict=True)) + list(zip(self.cross_keys, self.cross_values,
                                                                             strict=True))
        for (keys, values), (k, v) in zip(targets, saved, strict=True):
            keys[slot, :, :k.shape[1]].copy_(k, non_blocking=True)
            values[slot, :, :v.shape[1]].copy_(v, non_blocking=True)
        if self.cross_keys:
            self.source_lengths[slot] = saved[len(self.keys)][0].shape[1]
        self.offloaded -= 1

    def forget(self) -> None:
        """A host copy was dropped without restoring it (its sequence finished or was cancelled)."""
        self.offloaded -= 1
