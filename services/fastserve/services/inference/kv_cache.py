"""The model runner's KV cache: preallocated slots, one per resident sequence, and their host copies.

Each layer holds keys and values as [slots, heads, context, head_dim]. Which sequence has which slot,
and whether an evicted one is copied to host memory or recomputed, is the scheduler's decision
(kv_slots.py keeps its ledger); this module only moves the tensors it is told to. An encoder-decoder
also keeps, per slot, the cross-attention keys and values of its sequence's encoder states. Nothing
on the device is allocated per request: its memory is fixed when the model loads.
"""

from __future__ import annotations

import torch


def slot_bytes(context: int, kv_heads: list[int], head_dim: int, dtype: torch.dtype, source: int = 0) -> int:
    """Bytes of one slot's keys and values over every layer (and its cross-attention states)."""
    return 2 * sum(kv_heads) * head_dim * (context + source) * dtype.itemsize


class KVCache:
    def __init__(self, slots: int, context: int, kv_heads: list[int], head_dim: int, dtype: torch.dtype,
                 device: torch.device, source: int = 0) -> None:
        """`source`: the longest encoder input of an encoder-decoder (0: a decoder-only model)."""
        self.slots, self.context = slots, context
        self.keys = [torch.zeros(slots, h, context, head_dim, dtype=dtype, device=device) for h in kv_heads]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.cross_keys = [torch.zeros(slots, h, source, head_dim, dtype=dtype, device=device)
                           for h in kv_heads] if source else []
        self.cross_values = [torch.zeros_like(k) for k in self.cross_keys]
        self.source_lengths = torch.zeros(slots, dtype=torch.long, device=device)
        self.pin = device.type == "cuda"

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

    def offload(self, slot: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A host copy of a slot's first `length` positions (and its cross-attention states)."""
        source = int(self.source_lengths[slot])
        pairs = [(k, v, length) for k, v in zip(self.keys, self.values, strict=True)]
        pairs += [(k, v, source) for k, v in zip(self.cross_keys, self.cross_values, strict=True)]
        saved = [(k[slot, :, :n].to("cpu", copy=True), v[slot, :, :n].to("cpu", copy=True)) for k, v, n in pairs]
        if self.pin:
            saved = [(k.pin_memory(), v.pin_memory()) for k, v in saved]
        return saved

    def copy(self, src: int, dst: int, length: int) -> None:
        """Slot `src`'s first `length` positions (and its cross-attention states) into slot `dst`."""
        for keys, values in zip(self.keys, self.values, strict=True):
            keys[dst, :, :length].copy_(keys[src, :, :length])
            values[dst, :, :length].copy_(values[src, :, :length])
        for keys, values in zip(self.cross_keys, self.cross_values, strict=True):
            keys[dst].copy_(keys[src])
            values[dst].copy_(values[src])
        self.source_lengths[dst] = self.source_lengths[src]

    def restore(self, slot: int, saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        targets = list(zip(self.keys, self.values, strict=True)) + list(zip(self.cross_keys, self.cross_values,
                                                                             strict=True))
        for (keys, values), (k, v) in zip(targets, saved, strict=True):
            keys[slot, :, :k.shape[1]].copy_(k, non_blocking=True)
            values[slot, :, :v.shape[1]].copy_(v, non_blocking=True)
        if self.cross_keys:
            self.source_lengths[slot] = saved[len(self.keys)][0].shape[1]
