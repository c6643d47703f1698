"""Attention of one packed step against the KV cache: the `attend` and `cross` callbacks the decoder calls.

Decode rows (one new token over a cached sequence) attend in one batched call over a view of the first
slots; prefill chunks attend one call each over their own slot; masks (with a model's position bias)
are built once per step and shared by all layers. A few decode rows much longer than the rest attend
on their own when that is cheaper (`separate_decode_rows`), so short rows do not pay for the longest.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastserve.services.inference.decoder import Attend, Cross, Decoder
from fastserve.services.inference.kv_cache import KVCache

# The cost of one attention call in units of one query over one cached key. One batched call over
# the first `upper` slots costs `upper * width`, so a few long sequences among short ones make every
# row pay for the longest; on CPU a call of its own is cheap next to that (measured: 13 us, against
# 0.05 us per slot and key), while on a GPU a launch costs more than a whole batched call.
CALL_COST = {"cpu": 256, "cuda": 65536}

# (first row, tokens, slot, tokens already in the slot) of a chunk that attends over its own slot
Prefill = tuple[int, int, int, int]


def separate_decode_rows(slots: list[int], lengths: list[int], call_cost: int) -> list[int]:
    """Indices of the decode rows worth attending on their own: the k longest, for the k that makes
    k single calls plus one batched call over the rest cheapest."""
    if len(slots) < 2:
        return []
    by_length = sorted(range(len(slots)), key=lambda i: -lengths[i])
    upper_of_rest = [0] * (len(slots) + 1)  # highest slot + 1 among by_length[k:]
    for k in range(len(slots) - 1, -1, -1):
        upper_of_rest[k] = max(upper_of_rest[k + 1], slots[by_length[k]] + 1)
    best_k, best_cost, alone_cost = 0, call_cost + upper_of_rest[0] * lengths[by_length[0]], 0
    for k in range(1, len(slots) + 1):
        alone_cost += call_cost + lengths[by_length[k - 1]]
        rest_cost = call_cost + upper_of_rest[k] * lengths[by_length[k]] if k < len(slots) else 0
        cost = alone_cost + rest_cost
        if cost < best_cost:
            best_k, best_cost = k, cost
    return by_length[:best_k]


def step_attention(decoder: Decoder, cache: KVCache, call_cost: int, slots_t: torch.Tensor, pos_t: torch.Tensor,
                   decode_rows: list[int], decode_slots: list[int], decode_lengths: list[int],
                   prefills: list[Prefill]) -> Attend:
    """The attend callback for one step."""
    device = decoder.device
    alone = separate_decode_rows(decode_slots, decode_lengths, call_cost)
    if alone:  # attended like one-token prefills, each over its own slot
        prefills = prefills + [(decode_rows[i], 1, decode_slots[i], decode_lengths[i] - 1) for i in alone]
        kept = sorted(set(range(len(decode_rows))) - set(alone))
        decode_rows, decode_slots, decode_lengths = ([values[i] for i in kept] for values in
                                                     (decode_rows, decode_slots, decode_lengths))
    if decode_rows:
        # Decode rows attend over a view of the first `upper` slots (no gather): a slot without a
        # decode row this step gets a dummy query over position 0, and its output is ignored.
        upper, width = max(decode_slots) + 1, max(decode_lengths)
        lengths = torch.ones(upper, dtype=torch.long, device=device)
        dec_slots = torch.tensor(decode_slots, device=device)
        lengths[dec_slots] = torch.tensor(decode_lengths, device=device)
        decode_mask = _mask(decoder, torch.arange(width, device=device)[None, :] < lengths[:, None], lengths - 1,
                            width)[:, :, None, :]
        dec_rows = torch.tensor(decode_rows, device=device)
    prefill_masks = [_mask(decoder, torch.arange(start + n, device=device)[None, :] <=
                           torch.arange(start, start + n, device=device)[:, None],
                           torch.arange(start, start + n, device=device), start + n).transpose(0, 1)
                     for _, n, _, start in prefills]  # [1 or heads, n, keys]
    # One query at the end of its slot sees every key: without a position bias it needs no mask.
    prefill_masks = [None if n == 1 and mask.dtype == torch.bool else mask
                     for (_, n, _, _), mask in zip(prefills, prefill_masks, strict=True)]

    def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
               ) -> torch.Tensor:
        cache.write(layer, slots_t, pos_t, k, v)
        keys, values = cache.keys[layer], cache.values[layer]
        scale, gqa = decoder.scales[layer] if scale is None else scale, q.shape[1] != k.shape[1]
        out = torch.empty_like(q)
        if decode_rows:
            queries = q.new_zeros(upper, q.shape[1], 1, q.shape[2])
            queries[dec_slots, :, 0] = q[dec_rows]
            o = F.scaled_dot_product_attention(queries, keys[:upper, :, :width], values[:upper, :, :width],
                                               attn_mask=decode_mask, scale=scale, enable_gqa=gqa)
            out[dec_rows] = o[dec_slots, :, 0]
        for (row, n, slot, start), mask in zip(prefills, prefill_masks, strict=True):
            o = F.scaled_dot_product_attention(
                q[row:row + n].transpose(0, 1)[None], keys[slot:slot + 1, :, :start + n],
                values[slot:slot + 1, :, :start + n], attn_mask=mask, scale=scale, enable_gqa=gqa)
            out[row:row + n] = o[0].transpose(0, 1)
        return out.reshape(q.shape[0], -1)

    return attend


def _mask(decoder: Decoder, allowed: torch.Tensor, query_positions: torch.Tensor, keys: int) -> torch.Tensor:
    """A boolean mask [n, 1, keys], or with a model's position bias an additive one [n, heads, keys]."""
    bias = decoder.position_bias(query_positions, keys)
    if bias is None:
        return allowed[:, None, :]
    return bias.masked_fill(~allowed[:, None, :], float("-inf"))


def step_cross_attention(decoder: Decoder, cache: KVCache, slots_t: torch.Tensor, decode_rows: list[int],
                         prefills: list[Prefill]) -> Cross | None:
    """The cross-attention callback of an encoder-decoder: each token attends over its own slot's
    encoder states."""
    if not decoder.encoder_decoder:
        return None
    device = decoder.device
    sources = cache.source_lengths
    rows = torch.tensor(decode_rows + [row + i for row, n, _, _ in prefills for i in range(n)], device=device)
    row_slots = slots_t[rows]
    upper = int(row_slots.max()) + 1
    width = int(sources[:upper].max())
    mask = (torch.arange(width, device=device)[None, :] < sources[:upper, None].clamp(min=1))[:, None, None, :]

    def cross(layer: int, q: torch.Tensor) -> torch.Tensor:
        # One query per token, laid out by slot; tokens of one slot (a chunked prefill) take turns.
        out = torch.empty_like(q)
        pending = list(zip(rows.tolist(), row_slots.tolist(), strict=True))
        while pending:
            seen, now, later = set(), [], []
            for row, slot in pending:
                (later if slot in seen else now).append((row, slot))
                seen.add(slot)
            now_rows = torch.tensor([r for r, _ in now], device=device)
            now_slots = torch.tensor([s for _, s in now], device=device)
            queries = q.new_zeros(upper, q.shape[1], 1, q.shape[2])
            queries[now_slots, :, 0] = q[now_rows]
            o = F.scaled_dot_product_attention(queries, cache.cross_keys[layer][:upper, :, :width],
                                               cache.cross_values[layer][:upper, :, :width], attn_mask=mask,
                                               scale=decoder.scales[layer])
            out[now_rows] = o[now_slots, :, 0]
            pending = later
        return out.reshape(q.shape[0], -1)

    return cross
