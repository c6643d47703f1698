"""The model runner: executes one scheduled step (step.py) on the model's device and samples.

It owns everything that is a tensor: the KV cache and the host copies of evicted caches, the
decoder, and each running sequence's sampler (its random generator) with the tokens it has seen.
A step's copies run first (offloads before the restores and encodes that may reuse those slots),
then all its tokens, decode tokens and prefill chunks of many sequences, as one packed forward pass
in which attention reads each sequence's own slot (attention.py). It decides nothing: which
sequences, slots and copies is the scheduler's, so another runner (say one replaying CUDA graphs over
device-resident inputs) can take its place behind the same `execute`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastserve.services.inference.attention import CALL_COST, step_attention, step_cross_attention
from fastserve.services.inference.decoder import Decoder
from fastserve.services.inference.kv_cache import KVCache
from fastserve.services.inference.sampling import Sampler, choose_tokens
from fastserve.services.inference.step import RunnerOutput, SchedulerOutput


@dataclass(slots=True)
class _Running:
    sampler: Sampler
    tokens: list[int]  # its start and every token sampled since: what a repetition penalty has seen
    source: list[int] | None


class ModelRunner:
    def __init__(self, decoder: Decoder, slots: int, context: int) -> None:
        self.decoder = decoder
        self.cache = KVCache(slots, context, decoder.kv_heads, decoder.head_dim, decoder.dtype, decoder.device,
                             source=decoder.max_source if decoder.encoder_decoder else 0)
        self.call_cost = CALL_COST.get(decoder.device.type, CALL_COST["cuda"])
        self.running: dict[int, _Running] = {}
        self.host: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # evicted caches, by sequence

    @torch.inference_mode()
    def execute(self, step: SchedulerOutput) -> RunnerOutput:
        self._apply(step)
        if not step.sequences:
            return RunnerOutput()
        return self._run(step)

    def _apply(self, step: SchedulerOutput) -> None:
        for seq_id in step.finished_ids:
            self.running.pop(seq_id, None)
            self.host.pop(seq_id, None)
        for new in step.new_sequences:
            self.running[new.seq_id] = _Running(Sampler(new.params), list(new.token_ids), new.source)
        for op in step.offloads:
            self.host[op.seq_id] = self.cache.offload(op.slot, op.length)
        for op in step.restores:
            self.cache.restore(op.slot, self.host.pop(op.seq_id))
        for op in step.encodes:
            self.cache.write_cross(op.slot, self.decoder.encode(self.running[op.seq_id].source))

    def _run(self, step: SchedulerOutput) -> RunnerOutput:
        """One packed forward pass; the next token of each sequence whose pending tokens all ran."""
        device = self.decoder.device
        ids, positions, slots = [], [], []
        decode_rows, decode_slots, decode_lengths, prefills, last_rows = [], [], [], [], []
        out = RunnerOutput()
        for s in step.sequences:
            row, n = len(ids), len(s.token_ids)
            ids.extend(s.token_ids)
            positions.extend(range(s.start, s.start + n))
            slots.extend([s.slot] * n)
            if n == 1 and s.start > 0:
                decode_rows.append(row)
                decode_slots.append(s.slot)
                decode_lengths.append(s.start + 1)
            else:
                prefills.append((row, n, s.slot, s.start))
            if s.sample:
                last_rows.append(row + n - 1)
                out.seq_ids.append(s.seq_id)
        as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
        ids_t, pos_t, slots_t = as_tensor(ids), as_tensor(positions), as_tensor(slots)
        attend = step_attention(self.decoder, self.cache, self.call_cost, slots_t, pos_t, decode_rows, decode_slots,
                                decode_lengths, prefills)
        cross = step_cross_attention(self.decoder, self.cache, slots_t, decode_rows, prefills)
        hidden = self.decoder.forward(ids_t, pos_t, attend, cross)
        if not out.seq_ids:
            return out
        logits = self.decoder.logits(hidden[as_tensor(last_rows)])
        sampling = [self.running[seq_id] for seq_id in out.seq_ids]
        tokens = choose_tokens(logits, [r.sampler for r in sampling], [r.tokens for r in sampling])
        for r, token in zip(sampling, tokens, strict=True):
            r.tokens.append(token)
            out.sampled_token_ids.append([token])
        return out
