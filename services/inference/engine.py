"""The generation engine: continuous batching at iteration level over an engine-owned KV cache.

One thread runs steps. Each step it takes new requests, drops cancelled and expired ones, asks the
policy for an order, and runs the first sequences that fit: at most `max_batch_size` sequences, at
most `max_prefill_tokens` prompt tokens (long prompts are prefilled in chunks across steps, between
decode steps of the others), and only sequences that hold a KV slot or can get one. Sequences that
do not run keep their slot while they are not in the way; a higher-priority sequence that needs a
slot evicts the lowest-priority idle one, whose cache goes to host memory or is recomputed later.
All tokens of a step run as one packed forward pass, on the process's compute thread; attention
reads each sequence's own slot.

Requests that cannot be queued (the engine is at `kv_slots + max_queue_size` sequences) are refused
at once with RESOURCE_EXHAUSTED, so memory stays bounded under any load.
"""

from __future__ import annotations

import enum
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from services.inference.compute import on_compute_thread
from services.inference.decoder import Decoder
from services.inference.generation_metrics import EngineMetrics
from services.inference.kv_cache import KVCache
from services.inference.sampling import Sampler, SamplingParams, choose_tokens
from services.inference.scheduling import MlfqSettings, make_policy
from shared.errors import InvalidArgument, ResourceExhausted, Unavailable

log = logging.getLogger(__name__)


class Finish(enum.StrEnum):
    LENGTH = "length"
    STOP = "stop"
    EOS = "eos"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class GenerationSettings:
    policy: str = "fcfs"  # or mlfq
    max_batch_size: int = 32  # sequences in one step
    kv_slots: int = 0  # sequences whose cache is resident; 0: max_batch_size (twice that for mlfq)
    host_slots: int = -1  # evicted caches kept in host memory; -1: as many as kv_slots
    context: int = 0  # tokens per slot (prompt + completion); 0: the model's window, at most 2048
    max_queue_size: int = 256  # sequences waiting beyond the resident ones
    max_prefill_tokens: int = 256  # prompt tokens per step
    mlfq: MlfqSettings = field(default_factory=MlfqSettings)

    def slots(self) -> int:
        return self.kv_slots or self.max_batch_size * (2 if self.policy == "mlfq" else 1)

    def check(self) -> None:
        """Refuse settings no engine can run, naming the ModelConfig field."""
        for name, value, least in (("batching.max_batch_size", self.max_batch_size, 1),
                                   ("batching.max_queue_size", self.max_queue_size, 0),
                                   ("generation.kv_slots", self.kv_slots, 0),
                                   ("generation.context", self.context, 0),
                                   ("generation.max_prefill_tokens", self.max_prefill_tokens, 1),
                                   ("generation.host_slots", self.host_slots, -1),
                                   ("generation.mlfq_levels", self.mlfq.levels, 1),
                                   ("generation.mlfq_base_quantum", self.mlfq.base_quantum, 1),
                                   ("generation.mlfq_starvation_ms", self.mlfq.starvation_ms, 1),
                                   ("generation.mlfq_oldest_places", self.mlfq.oldest_places, 0)):
            if value < least:
                raise InvalidArgument(f"{name} must be at least {least}, got {value}", field=f"config.{name}")



@dataclass(eq=False)
class Sequence:
    """One request inside the engine. Only the engine thread changes it, except `cancel`."""

    prompt: list[int]  # what the decoder starts from: the prompt, or an encoder-decoder's start token
    sampler: Sampler
    priority: int
    deadline: float | None
    source: list[int] | None = None  # an encoder-decoder's input
    encoded: bool = False  # its encoder states are in its slot
    order: int = 0
    arrival: float = field(default_factory=time.monotonic)
    tokens: list[int] = field(default_factory=list)  # prompt + generated: what the cache must hold
    cached: int = 0  # leading tokens whose keys/values are in the slot
    slot: int | None = None
    saved: list | None = None  # host copy of an evicted cache
    level: int = 0
    quantum_used: int = 0
    waited: float = 0.0  # seconds left out of steps since it entered its MLFQ level
    started: float | None = None
    first_token: float | None = None
    last_token: float = 0.0
    running: bool = False  # ran in the latest step
    finished: float | None = None
    finish: Finish | None = None
    preemptions: int = 0
    cancelled: bool = False
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)  # lists of new ids, then None
    done: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.tokens = list(self.prompt)

    @property
    def prompt_tokens(self) -> int:
        return len(self.source if self.source is not None else self.prompt)

    @property
    def generated(self) -> list[int]:
        return self.tokens[len(self.prompt):]

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class StepStats:
    steps: int = 0
    tokens: int = 0
    compute_s: float = 0.0
    batch_sizes: dict[int, int] = field(default_factory=dict)
    preemptions: int = 0


# The cost of one attention call in units of one query over one cached key. One batched call over
# the first `upper` slots costs `upper * width`, so a few long sequences among short ones make every
# row pay for the longest; on CPU a call of its own is cheap next to that (measured: 13 us, against
# 0.05 us per slot and key), while on a GPU a launch costs more than a whole batched call.
CALL_COST = {"cpu": 256, "cuda": 65536}


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


class Engine:
    def __init__(self, name: str, decoder: Decoder, settings: GenerationSettings, eos_ids: set[int],
                 decode: Callable[[list[int]], str]) -> None:
        self.name, self.decoder, self.settings, self.eos_ids, self.decode = name, decoder, settings, eos_ids, decode
        self.context = min(settings.context or decoder.max_positions, decoder.max_positions, 2048)
        self.cache = KVCache(settings.slots(), self.context, decoder.kv_heads, decoder.head_dim, decoder.dtype,
                             decoder.device, settings.slots() if settings.host_slots < 0 else settings.host_slots,
                             source=decoder.max_source if decoder.encoder_decoder else 0)
        self.policy = make_policy(settings.policy, settings.mlfq)
        self.call_cost = CALL_COST.get(decoder.device.type, CALL_COST["cuda"])
        self.active: list[Sequence] = []  # owned by the engine thread
        self.incoming: list[Sequence] = []
        self.counter = itertools.count()
        self.cond = threading.Condition()
        self.accepting = True
        self.stats = StepStats()
        self.last_step = time.monotonic()
        self.metrics = EngineMetrics(name, settings.policy, settings.mlfq.levels if settings.policy == "mlfq" else 1)
        self.thread = threading.Thread(target=self._loop, daemon=True, name=f"engine-{name}")
        self.thread.start()

    # --- called from request threads -------------------------------------------------------------------------

    def submit(self, prompt: list[int], params: SamplingParams, priority: int = 0,
               deadline: float | None = None) -> Sequence:
        if self.decoder.encoder_decoder:
            seq = Sequence([self.decoder.start_id], Sampler(params), priority, deadline, source=prompt)
        else:
            seq = Sequence(prompt, Sampler(params), priority, deadline)
        with self.cond:
            if not self.accepting:
                raise Unavailable(f"model {self.name} is unloading")
            limit = self.cache.slots + self.settings.max_queue_size
            if len(self.active) + len(self.incoming) >= limit:
                raise ResourceExhausted(f"{self.name} holds {limit} sequences, its limit; retry later")
            seq.order = next(self.counter)
            self.incoming.append(seq)
            self.cond.notify()
        return seq

    def drain(self, timeout: float = 120.0) -> None:
        """Stop accepting, finish every sequence already in, then stop the thread."""
        with self.cond:
            self.accepting = False
            self.cond.notify()
        self.thread.join(timeout)

    # --- the engine thread ------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.incoming and not self.active:
                    if not self.accepting:
                        return
                    self.cond.wait()
                for seq in self.incoming:
                    self.policy.enter(seq)
                self.active.extend(self.incoming)
                self.incoming.clear()
            try:
                on_compute_thread(self._step)
            except Exception:  # noqa: BLE001 - fail the sequences in the step, keep serving the rest
                log.exception("generation step failed in %s", self.name)
                for seq in list(self.active):
                    self._finish(seq, Finish.CANCELLED)

    @torch.inference_mode()
    def _step(self) -> None:
        self.step()

    def step(self) -> None:
        now = time.monotonic()
        for seq in list(self.active):
            if seq.cancelled or (seq.deadline is not None and now > seq.deadline):
                self._finish(seq, Finish.CANCELLED)
        if not self.active:
            return
        self.metrics.promotions.inc(self.policy.promote(self.active))
        ordered = self.policy.order(self.active, self.settings.max_batch_size)
        batch = self._select(ordered)
        chosen = {id(seq) for seq, _ in batch}
        for seq in self.active:  # time since the previous step, charged to those that sit this one out
            if id(seq) not in chosen:
                seq.waited += now - max(self.last_step, seq.arrival)
        self.last_step = now
        self._observe_queues(ordered, chosen)
        if not batch:
            return
        start = time.perf_counter()
        sampled = self._run(batch)
        seconds = time.perf_counter() - start
        now = time.monotonic()
        for seq, token in sampled:
            self._append(seq, token, now)
        self._count_step(len(batch), len(sampled), seconds)

    def _select(self, ordered: list[Sequence]) -> list[tuple[Sequence, int]]:
        """(sequence, tokens to process) for this step, in policy order."""
        batch: list[tuple[Sequence, int]] = []
        budget = self.settings.max_prefill_tokens
        chosen: set[int] = set()
        for seq in ordered:
            if len(batch) >= self.settings.max_batch_size:
                break
            pending = len(seq.tokens) - seq.cached
            chunk = 1 if pending == 1 else min(pending, budget)
            if chunk == 0:
                continue
            if seq.slot is None and not self._place(seq, ordered, chosen):
                continue  # no slot it may take; a lower-ranked sequence that holds one can still run
            if pending > 1:
                budget -= chunk
            batch.append((seq, chunk))
            chosen.add(id(seq))
        for seq in ordered:
            if seq.running and id(seq) not in chosen:  # ran last step, not this one: preempted
                seq.preemptions += 1
                self.stats.preemptions += 1
                self.metrics.preemptions.inc()
            seq.running = id(seq) in chosen
        return batch

    def _place(self, seq: Sequence, ordered: list[Sequence], chosen: set[int]) -> bool:
        """Give `seq` a KV slot, evicting the lowest-ranked idle resident sequence if none is free."""
        slot = self.cache.allocate()
        if slot is None:
            victim = next((s for s in reversed(ordered) if s.slot is not None and id(s) not in chosen
                           and s is not seq), None)
            if victim is None or ordered.index(victim) < ordered.index(seq):
                return False
            self._evict(victim)
            slot = self.cache.allocate()
        seq.slot = slot
        if seq.saved is not None:
            self.cache.restore(slot, seq.saved)
            seq.saved = None
        elif seq.source is not None and not seq.encoded:
            self.cache.write_cross(slot, self.decoder.encode(seq.source))
            seq.encoded = True
        return True

    def _evict(self, seq: Sequence) -> None:
        saved = self.cache.offload(seq.slot, seq.cached)
        if saved is None:  # the host pool is full: drop the cache and prefill again when it runs
            self.cache.release(seq.slot)
            seq.cached, seq.encoded = 0, False
            self.metrics.evictions["recompute"].inc()
        else:
            seq.saved = saved
            self.metrics.evictions["host"].inc()
        seq.slot = None

    def _run(self, batch: list[tuple[Sequence, int]]) -> list[tuple[Sequence, int]]:
        """One packed forward pass; the next token of each sequence whose pending tokens all ran."""
        device = self.decoder.device
        ids, positions, slots = [], [], []
        decode_rows, decode_slots, decode_lengths, prefills, last_rows, sampling = [], [], [], [], [], []
        for seq, chunk in batch:
            row = len(ids)
            ids.extend(seq.tokens[seq.cached:seq.cached + chunk])
            positions.extend(range(seq.cached, seq.cached + chunk))
            slots.extend([seq.slot] * chunk)
            if chunk == 1 and seq.cached > 0:
                decode_rows.append(row)
                decode_slots.append(seq.slot)
                decode_lengths.append(seq.cached + 1)
            else:
                prefills.append((row, chunk, seq.slot, seq.cached))
            seq.cached += chunk
            if seq.cached == len(seq.tokens):
                last_rows.append(row + chunk - 1)
                sampling.append(seq)
            if seq.started is None:
                seq.started = time.monotonic()
        as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
        ids_t, pos_t, slots_t = as_tensor(ids), as_tensor(positions), as_tensor(slots)
        attend = self._attention(slots_t, pos_t, decode_rows, decode_slots, decode_lengths, prefills)
        hidden = self.decoder.forward(ids_t, pos_t, attend, self._cross(slots_t, decode_rows, decode_slots, prefills))
        if not sampling:
            return []
        logits = self.decoder.logits(hidden[as_tensor(last_rows)])
        tokens = choose_tokens(logits, [s.sampler for s in sampling], [s.tokens for s in sampling])
        return list(zip(sampling, tokens, strict=True))

    def _attention(self, slots_t, pos_t, decode_rows, decode_slots, decode_lengths, prefills):
        """The attend callback for one step; masks (with a model's position bias) are built once and
        shared by all layers."""
        device, cache = self.decoder.device, self.cache
        alone = separate_decode_rows(decode_slots, decode_lengths, self.call_cost)
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
            decode_mask = self._mask(torch.arange(width, device=device)[None, :] < lengths[:, None], lengths - 1,
                                     width)[:, :, None, :]
            dec_rows = torch.tensor(decode_rows, device=device)
        prefill_masks = [self._mask(torch.arange(start + n, device=device)[None, :] <=
                                    torch.arange(start, start + n, device=device)[:, None],
                                    torch.arange(start, start + n, device=device), start + n).transpose(0, 1)
                         for _, n, _, start in prefills]  # [1 or heads, n, keys]
        # One query at the end of its slot sees every key: without a position bias it needs no mask.
        prefill_masks = [None if n == 1 and mask.dtype == torch.bool else mask
                         for (_, n, _, _), mask in zip(prefills, prefill_masks, strict=True)]

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            cache.write(layer, slots_t, pos_t, k, v)
            keys, values = cache.keys[layer], cache.values[layer]
            scale, gqa = self.decoder.scales[layer], q.shape[1] != k.shape[1]
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

    def _mask(self, allowed: torch.Tensor, query_positions: torch.Tensor, keys: int) -> torch.Tensor:
        """A boolean mask [n, 1, keys], or with a model's position bias an additive one [n, heads, keys]."""
        bias = self.decoder.position_bias(query_positions, keys)
        if bias is None:
            return allowed[:, None, :]
        return bias.masked_fill(~allowed[:, None, :], float("-inf"))

    def _cross(self, slots_t, decode_rows, decode_slots, prefills):
        """The cross-attention callback of an encoder-decoder: each token attends over its own slot's
        encoder states."""
        if not self.decoder.encoder_decoder:
            return None
        cache, device = self.cache, self.decoder.device
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
                                                   scale=self.decoder.scales[layer])
                out[now_rows] = o[now_slots, :, 0]
                pending = later
            return out.reshape(q.shape[0], -1)

        return cross

    def _append(self, seq: Sequence, token: int, now: float) -> None:
        params = seq.sampler.params
        if seq.first_token is None:
            seq.first_token = now
            self.metrics.ttft.observe(now - seq.arrival)
        else:
            self.metrics.itl.observe(now - seq.last_token)
        seq.last_token = now
        if token in self.eos_ids:
            return self._finish(seq, Finish.EOS)
        if token in params.stop_token_ids:
            return self._finish(seq, Finish.STOP)
        seq.tokens.append(token)
        seq.events.put([token])
        if self.policy.account(seq, 1):
            self.metrics.demotions.inc()
        if params.stop_sequences:
            longest = max(map(len, params.stop_sequences))
            tail = self.decode(seq.generated[-(4 * longest + 8):])
            if any(stop in tail for stop in params.stop_sequences):
                return self._finish(seq, Finish.STOP)
        if len(seq.generated) >= params.max_new_tokens or len(seq.tokens) >= self.context:
            self._finish(seq, Finish.LENGTH)

    def _finish(self, seq: Sequence, reason: Finish) -> None:
        if seq.slot is not None:
            self.cache.release(seq.slot)
            seq.slot = None
        if seq.saved is not None:
            self.cache.forget()
            seq.saved = None
        seq.finish, seq.finished = reason, time.monotonic()
        self.active.remove(seq)
        seq.events.put(None)
        seq.done.set()

    def _observe_queues(self, ordered: list[Sequence], chosen: set[int]) -> None:
        per_level: dict[int, int] = {}
        for seq in ordered:
            if id(seq) not in chosen:
                per_level[seq.level] = per_level.get(seq.level, 0) + 1
        for level, gauge in enumerate(self.metrics.queue_length):
            gauge.set(per_level.get(level, 0))

    def _count_step(self, batch: int, tokens: int, seconds: float) -> None:
        s = self.stats
        s.steps += 1
        s.tokens += tokens
        s.compute_s += seconds
        s.batch_sizes[batch] = s.batch_sizes.get(batch, 0) + 1
        self.metrics.tokens.inc(tokens)
        self.metrics.occupancy.observe(batch / self.settings.max_batch_size)
        self.metrics.step_seconds.observe(seconds)
