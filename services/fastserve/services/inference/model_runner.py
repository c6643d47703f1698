"""The model runner: executes one scheduled step (step.py) on the model's device and samples.

It owns everything that is a tensor: the KV cache and the host copies of evicted caches, the
decoder, and the running sequences' sampling state (sampling.py's `BatchSampler`: a row of device
tensors each, its parameters, seed, length and token counts). A step's copies run first (offloads
before the restores and encodes that may reuse those slots), then all its tokens, decode tokens and
prefill chunks of many sequences, as one packed forward pass in which attention reads each sequence's
own slot (attention.py), then one batched sampling of the rows that end their pending tokens, read
back to the host once. It decides nothing: which sequences, slots and copies is the scheduler's, so
another runner (say one replaying CUDA graphs over device-resident inputs) can take its place behind
the same `execute`.

A failure that belongs to one sequence fails that sequence alone (`RunnerOutput.failed`): its sampling
parameters or encoder pass, its row of sampling, its response format's state. A failed packed forward
pass cannot say which sequence broke it, so each of its sequences runs again alone (positions are
rewritten in place, so a rerun is idempotent; the sampler changes its state only once its results are
read back, the last thing a pass does); those that fail alone fail, the others go on. Only a failure
outside these (a KV copy between device and host) leaves `execute` and fails the engine's step.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from fastserve.runtime.errors import InvalidArgument
from fastserve.services.inference.attention import CALL_COST, step_attention, step_cross_attention
from fastserve.services.inference.decoder import Decoder
from fastserve.services.inference.kv_cache import KVCache, slot_bytes
from fastserve.services.inference.sampling import BatchSampler, FormatMasks, Sampled
from fastserve.services.inference.step import RunnerOutput, ScheduledSequence, SchedulerOutput

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Running:
    source: list[int] | None
    constraint: Any = None  # its response format's state (structured_output.Constraint), if it has one


def _check_memory(per_slot: int, slots: int, host_slots: int, max_bytes: float) -> None:
    """Refuse a cache whose resident and host slots together would take more than `max_bytes`: each
    setting is bounded alone, but their product with the model's size is what takes the memory."""
    needed = per_slot * (slots + host_slots)
    if needed > max_bytes:
        raise InvalidArgument(
            f"the KV cache would take {needed / 2**30:.2f} GiB ({slots} resident + {host_slots} host slots of "
            f"{per_slot / 2**20:.1f} MiB), more than FASTSERVE_INFERENCE_KV_CACHE_GB allows "
            f"({max_bytes / 2**30:g} GiB); lower generation.kv_slots, generation.host_slots or generation.context",
            field="config.generation.kv_slots")


class ModelRunner:
    def __init__(self, decoder: Decoder, slots: int, context: int, host_slots: int = 0,
                 max_bytes: float = math.inf) -> None:
        self.decoder = decoder
        source = decoder.max_source if decoder.encoder_decoder else 0
        _check_memory(slot_bytes(context, decoder.kv_heads, decoder.head_dim, decoder.dtype, source), slots,
                      host_slots, max_bytes)
        self.cache = KVCache(slots, context, decoder.kv_heads, decoder.head_dim, decoder.dtype, decoder.device,
                             source=source)
        self.call_cost = CALL_COST.get(decoder.device.type, CALL_COST["cuda"])
        self.running: dict[int, _Running] = {}
        self.sampler = BatchSampler(decoder.vocab_size, decoder.device)
        self.formats = FormatMasks(decoder.device)
        self.host: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # evicted caches, by sequence

    @torch.inference_mode()
    def execute(self, step: SchedulerOutput) -> RunnerOutput:
        out = RunnerOutput()
        self._apply(step, out.failed)
        sequences = [s for s in step.sequences if s.seq_id not in out.failed]
        if sequences:
            self._run_isolating(sequences, out)
        return out

    def _apply(self, step: SchedulerOutput, failed: dict[int, str]) -> None:
        for seq_id in step.finished_ids:
            self.running.pop(seq_id, None)
            self.host.pop(seq_id, None)
            self.sampler.remove(seq_id)
        for new in step.new_sequences:
            try:
                grammar = new.params.grammar
                self.sampler.add(new.seq_id, new.params, new.token_ids)
                self.running[new.seq_id] = _Running(new.source, grammar.constraint() if grammar else None)
            except (RuntimeError, ValueError, OverflowError):  # a value the sampler's tables cannot hold
                self.sampler.remove(new.seq_id)
                log.warning("sequence %d cannot sample", new.seq_id, exc_info=True)
                failed[new.seq_id] = "its sampling parameters cannot be used"
        for op in step.offloads:
            self.host[op.seq_id] = self.cache.offload(op.slot, op.length)
        for op in step.copies:
            self.cache.copy(op.src_slot, op.dst_slot, op.length)
        for op in step.restores:
            self.cache.restore(op.slot, self.host.pop(op.seq_id))
        for op in step.encodes:
            if op.seq_id in failed:
                continue
            try:
                self.cache.write_cross(op.slot, self.decoder.encode(self.running[op.seq_id].source))
            except Exception as exc:  # noqa: BLE001 - its own input failed; the others' slots are untouched
                log.exception("encoding sequence %d failed", op.seq_id)
                failed[op.seq_id] = f"the encoder pass failed ({type(exc).__name__})"

    def _run_isolating(self, sequences: list[ScheduledSequence], out: RunnerOutput) -> None:
        """`_run`, and on failure each sequence again alone, so that only those that fail alone fail."""
        try:
            sampled = self._run(sequences)
        except Exception as exc:  # noqa: BLE001 - which sequence broke the pass is unknown
            if len(sequences) == 1:
                log.exception("the forward pass of sequence %d failed", sequences[0].seq_id)
                out.failed[sequences[0].seq_id] = f"the model's forward pass failed ({type(exc).__name__})"
                return
            log.warning("a forward pass of %d sequences failed (%s); running each alone", len(sequences),
                        type(exc).__name__)
            for s in sequences:
                self._run_isolating([s], out)
            return
        for seq_id, result in sampled:
            self._take(seq_id, result, out)

    def _run(self, sequences: list[ScheduledSequence]) -> list[tuple[int, Sampled]]:
        """One packed forward pass and the sampling of each sequence whose pending tokens all ran; its
        last step is the read back of what was sampled, so a pass that raises has changed no state."""
        device = self.decoder.device
        ids, positions, slots = [], [], []
        decode_rows, decode_slots, decode_lengths, prefills, last_rows, sampled = [], [], [], [], [], []
        for s in sequences:
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
                sampled.append(s.seq_id)
        as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
        ids_t, pos_t, slots_t = as_tensor(ids), as_tensor(positions), as_tensor(slots)
        attend = step_attention(self.decoder, self.cache, self.call_cost, slots_t, pos_t, decode_rows, decode_slots,
                                decode_lengths, prefills)
        cross = step_cross_attention(self.decoder, self.cache, slots_t, decode_rows, prefills)
        hidden = self.decoder.forward(ids_t, pos_t, attend, cross)
        if not sampled:
            return []
        logits = self.decoder.logits(hidden[as_tensor(last_rows)])
        constraints = [self.running[seq_id].constraint for seq_id in sampled]
        formatted = [j for j, c in enumerate(constraints) if c is not None]
        allowed, blocked = (self.formats.apply(logits, formatted, [constraints[j] for j in formatted]) if formatted
                            else (logits, None))
        # Logprobs are of the raw logits: the model's distribution, whatever the format allows.
        return list(zip(sampled, self.sampler.sample(allowed, sampled, raw=logits, blocked=blocked), strict=True))

    def _take(self, seq_id: int, result: Sampled, out: RunnerOutput) -> None:
        if result.error is not None:
            out.failed[seq_id] = result.error
            return
        constraint = self.running[seq_id].constraint
        try:
            fits = constraint is None or self._advance(constraint, result.token)
        except Exception as exc:  # noqa: BLE001 - its own format's state broke; the batch's others are untouched
            log.exception("the response format of sequence %d failed", seq_id)
            out.failed[seq_id] = f"the response format failed ({type(exc).__name__})"
            return
        if not fits:
            out.failed[seq_id] = "the sampled token does not fit the response format"
            return
        out.seq_ids.append(seq_id)
        out.sampled_token_ids.append([result.token])
        if result.logprob is not None:
            out.logprobs[seq_id] = [result.logprob]

    @staticmethod
    def _advance(constraint, token: int) -> bool:
        """Move a response format's state past `token`. A complete format allows only EOS, which ends the
        sequence without moving the state."""
        try:
            constraint.advance(token)
        except ValueError:
            return constraint.finished
        return True
