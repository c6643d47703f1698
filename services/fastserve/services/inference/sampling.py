"""Choosing the next tokens of a batch from its logits, on the logits' device, in a few batched tensor ops.

Each running sequence has a row in the `BatchSampler`'s tables (allocated when the runner first sees it,
freed when it finishes); its parameters live there as device tensors (temperature, top-k, top-p, the
penalties, its seed) beside its length, and, for a penalised sequence, a row of token counts that each
sampled token updates in place (a scatter), so a step builds nothing from Python token lists. What a step
does, for the rows [n, vocab] it is given:

- penalties, on the penalised rows alone: the repetition penalty (transformers' definition, over the
  prompt and the generated tokens) then `presence * (count > 0) + frequency * count` subtracted (OpenAI's,
  over the generated tokens);
- one argmax for every row (what the greedy ones take);
- for the sampling rows, `logits / temperature`, then top-k and top-p as a prefix of the row's tokens
  sorted by logit: the top-k rows share one `topk` of the largest k among them, and each keeps its own k;
  the top-p rows without a top-k sort their whole row; the others stay in vocabulary order. The draw is
  inverse-CDF over that order: one uniform per row, from a counter-based hash (splitmix64's mixer in
  int64 ops) of the sequence's seed and the position of the token it draws, found in the cumulative
  softmax, whose kept prefix (the top-p set) is the distribution the draw renormalises to. So a seeded
  sequence draws the same tokens whatever its batch mates and after a preemption (recompute included):
  the noise depends on nothing else. An unseeded one is given a random seed when it is added.
- raw logprobs (logprobs.py) of the rows that ask: one log-softmax and one top-k over those rows.

Only the sequences' parameters, known when they were added, choose which of these ops run (a host
mirror of each row's flags): nothing in the math is read back to the host. A step ends with one copy
of its results (tokens, each row's failure code, the logprobs) to the host; only then are the lengths
and counts of the rows that sampled advanced, so a step that raises before (the runner then reruns each
sequence alone) changes no state.

A row that cannot be sampled (NaN logits, NaN after its penalties, non-finite after its temperature,
nothing allowed by its response format) fails alone: its result carries the message for its caller.
The response format's mask is host-side by nature (outlines-core walks its automaton on the CPU):
`FormatMasks` has each constraint write its bitmask into a (pinned) host buffer, copied to the device
at once and expanded to a mask there.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

import torch

from fastserve.services.inference.logprobs import TokenLogprob
from fastserve.services.inference.sampling_params import SamplingParams


class SamplingError(Exception):
    """One row could not be sampled; the message is safe to show its caller."""


# Failure codes, read back with the tokens; 0 is a sampled token.
_ERRORS = {
    1: "the model produced NaN logits for this sequence",
    2: "the sampling penalties made the logits NaN",
    3: "the response format allows no token here",
    4: "sampling produced non-finite probabilities (temperature or penalty out of range)",
}

# splitmix64's constants as int64 (two's complement): torch has no uint64 arithmetic, and int64 products
# wrap the same way.
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """A logical right shift of int64: torch's `>>` extends the sign."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    return z ^ _shift_right(z, 31)


def uniform(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """float32 in [0, 1), a multiple of 2^-24, for each (seed, position) of two int64 tensors: the same
    pair gives the same number on any device and in any batch. The seed is mixed before the position is
    added, so seed + 1 (a request's next completion) is not the same stream shifted."""
    z = _mix(_mix(seeds) + (positions + 1) * _GOLDEN)
    return _shift_right(z, 40).to(torch.float32) * 2.0**-24


def _draw(values: torch.Tensor, u: torch.Tensor, top_p: torch.Tensor | None) -> torch.Tensor:
    """Per row of `values` [m, width] (logits / temperature, -inf for a token left out): the position
    drawn by inverse CDF with `u` [m], among the prefix of the row whose mass first reaches its `top_p`
    [m] (the whole row where it is 1 or None; the row must be sorted descending where it is below 1)."""
    probs = values.softmax(-1)
    cumulative = probs.cumsum(-1)
    width = values.shape[-1]
    if top_p is None:
        mass = cumulative[:, -1:]
    else:  # keep a token while the mass before it is below top_p: the first always
        kept = ((cumulative - probs) < top_p.unsqueeze(1)).sum(-1)
        kept = torch.where(top_p >= 1.0, width, kept).clamp_(1, width)
        mass = cumulative.gather(1, (kept - 1).unsqueeze(1))
    # Strictly below the kept mass: the first cumulative value above it is then a kept token of some mass.
    target = torch.minimum(u.unsqueeze(1) * mass, torch.nextafter(mass, torch.zeros_like(mass)))
    return torch.searchsorted(cumulative, target, right=True).squeeze(1).clamp_(0, width - 1)


# Columns of the parameter tables.
_TEMPERATURE, _TOP_P, _REPETITION, _PRESENCE, _FREQUENCY = range(5)
_SEED, _TOP_K, _PENALTY_ROW, _LENGTH = range(4)


@dataclass(frozen=True, slots=True)
class Sampled:
    """One row's result: its token, or the error that failed its sequence; its logprob if it asked."""

    token: int | None
    error: str | None = None
    logprob: TokenLogprob | None = None


class _Rows:
    """Free row numbers of a table that doubles when they run out."""

    def __init__(self) -> None:
        self.capacity, self.free = 0, []

    def take(self) -> int:
        if not self.free:
            self.free = list(range(2 * self.capacity + 7, self.capacity - 1, -1))
            self.capacity = 2 * self.capacity + 8
        return self.free.pop()

    def give(self, row: int) -> None:
        self.free.append(row)


def _grown(table: torch.Tensor | None, rows: int, width: int, dtype: torch.dtype, device: torch.device,
           fill: float = 0) -> torch.Tensor:
    """`table` with at least `rows` rows (its old ones kept), `width` columns."""
    if table is not None and table.shape[0] >= rows:
        return table
    grown = torch.full((rows, width), fill, dtype=dtype, device=device)
    if table is not None:
        grown[:table.shape[0]] = table
    return grown


class BatchSampler:
    """The running sequences' sampling state, one row each, and the batched step over it."""

    def __init__(self, vocab: int, device: torch.device) -> None:
        self.vocab, self.device = vocab, device
        self.rows: dict[int, int] = {}  # seq_id -> row
        self.params: dict[int, SamplingParams] = {}  # row -> its parameters: which ops a step runs
        self.penalty_row: dict[int, int] = {}  # row -> its row of counts, for the penalised ones
        self._rows, self._penalty_rows = _Rows(), _Rows()
        self.floats: torch.Tensor | None = None  # [rows, 5]: temperature, top_p, repetition, presence, frequency
        self.ints: torch.Tensor | None = None  # [rows, 4]: seed, top_k, penalty row, length
        self.counts: torch.Tensor | None = None  # [penalty rows, vocab] float32: generated tokens' counts
        self.prompt_seen: torch.Tensor | None = None  # [penalty rows, vocab] bool: the prompt's tokens

    def add(self, seq_id: int, params: SamplingParams, token_ids: list[int]) -> None:
        """Give `seq_id` a row: its parameters, and `token_ids` (what it starts from: a repetition penalty
        counts them as seen, presence and frequency penalties count only what it generates after them).
        ValueError, OverflowError or RuntimeError (nothing kept) if its values do not fit the tables."""
        seed = secrets.randbits(63) if params.seed is None else params.seed
        top_k = params.top_k if 0 < params.top_k < self.vocab else 0
        floats = torch.tensor([params.temperature, params.top_p, params.repetition_penalty, params.presence_penalty,
                               params.frequency_penalty], dtype=torch.float32)
        ints = torch.tensor([seed, top_k, -1, len(token_ids)], dtype=torch.long)
        seen = torch.tensor([t for t in token_ids if 0 <= t < self.vocab], dtype=torch.long)
        row = self._rows.take()
        try:
            self._keep(row, params, floats, ints, seen)
        except Exception:
            self._free(row)
            raise
        self.rows[seq_id] = row

    def _keep(self, row: int, params: SamplingParams, floats: torch.Tensor, ints: torch.Tensor,
              seen: torch.Tensor) -> None:
        self.floats = _grown(self.floats, self._rows.capacity, 5, torch.float32, self.device)
        self.ints = _grown(self.ints, self._rows.capacity, 4, torch.long, self.device)
        if params.penalised:
            penalty_row = self.penalty_row[row] = self._penalty_rows.take()
            ints[_PENALTY_ROW] = penalty_row
            capacity = self._penalty_rows.capacity
            self.counts = _grown(self.counts, capacity, self.vocab, torch.float32, self.device)
            self.prompt_seen = _grown(self.prompt_seen, capacity, self.vocab, torch.bool, self.device)
            self.counts[penalty_row].zero_()
            self.prompt_seen[penalty_row].zero_()
            self.prompt_seen[penalty_row, seen.to(self.device)] = True
        self.floats[row] = floats.to(self.device)
        self.ints[row] = ints.to(self.device)
        self.params[row] = params

    def remove(self, seq_id: int) -> None:
        row = self.rows.pop(seq_id, None)
        if row is not None:
            self._free(row)

    def _free(self, row: int) -> None:
        self.params.pop(row, None)
        penalty_row = self.penalty_row.pop(row, None)
        if penalty_row is not None:
            self._penalty_rows.give(penalty_row)
        self._rows.give(row)

    def sample(self, logits: torch.Tensor, seq_ids: list[int], raw: torch.Tensor | None = None,
               blocked: torch.Tensor | None = None) -> list[Sampled]:
        """The next token of each of `seq_ids` from its row of `logits` [n, vocab] (float32; masked by a
        response format, `blocked` [n] bool marking the rows it allows nothing), with the logprobs of the
        `raw` logits (default `logits`) for the sequences that ask. Advances the state of those that sampled;
        changes nothing if it raises."""
        if logits.shape[-1] != self.vocab:
            self._resize(logits.shape[-1])
        raw = logits if raw is None else raw
        device, n = logits.device, len(seq_ids)
        host_rows = [self.rows[seq_id] for seq_id in seq_ids]
        params = [self.params[row] for row in host_rows]
        rows = torch.tensor(host_rows, device=device)
        codes = torch.isnan(logits).any(-1).to(torch.int32)
        penalised = [j for j, p in enumerate(params) if p.penalised]
        if penalised:
            logits, nan = self._penalise(logits, rows, penalised, params)
            codes = torch.where((codes == 0) & nan, 2, codes)
        tokens = logits.argmax(-1)
        drawing = [j for j, p in enumerate(params) if not p.greedy]
        if drawing:
            index = torch.tensor(drawing, device=device)
            drawn, bad = self._draw_rows(logits[index], rows[index], [params[j] for j in drawing])
            tokens = tokens.index_copy(0, index, drawn)
            codes = codes.index_copy(0, index, torch.where((codes[index] == 0) & bad, 4, codes[index]))
        if blocked is not None:
            codes = torch.where(blocked, 3, codes)
        asking = [j for j, p in enumerate(params) if p.logprobs]
        parts = [tokens.to(torch.int32), codes]
        if asking:
            parts += self._logprobs(raw, tokens, asking, [params[j].top_logprobs for j in asking])
        host = torch.cat(parts).cpu()  # the step's one read back
        self._advance(rows, tokens, codes == 0, penalised)
        return self._results(host, n, asking, params)

    # --- the steps ------------------------------------------------------------------------------------------------

    def _penalise(self, logits: torch.Tensor, rows: torch.Tensor, penalised: list[int],
                  params: list[SamplingParams]) -> tuple[torch.Tensor, torch.Tensor]:
        """(`logits` with the penalised rows' penalties, a copy; [n] bool: rows the penalties made NaN)."""
        index = torch.tensor(penalised, device=logits.device)
        own = rows[index]
        values = self.floats[own]
        penalty_rows = self.ints[own, _PENALTY_ROW]
        counts = self.counts[penalty_rows]
        part = logits[index]
        if any(params[j].repetition_penalty != 1.0 for j in penalised):
            r = values[:, _REPETITION:_REPETITION + 1]  # 1 in the rows without one: x * 1 == x / 1 == x
            present = self.prompt_seen[penalty_rows] | (counts > 0)
            part = torch.where(present, torch.where(part < 0, part * r, part / r), part)
        if any(params[j].presence_penalty != 0.0 or params[j].frequency_penalty != 0.0 for j in penalised):
            part = (part - values[:, _FREQUENCY:_FREQUENCY + 1] * counts
                    - values[:, _PRESENCE:_PRESENCE + 1] * (counts > 0))
        nan = torch.zeros(len(logits), dtype=torch.bool, device=logits.device)
        nan[index] = torch.isnan(part).any(-1)
        return logits.index_copy(0, index, part), nan

    def _draw_rows(self, logits: torch.Tensor, rows: torch.Tensor, params: list[SamplingParams]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """(token [m], [m] bool: not finite after the temperature) for sampling rows `logits` [m, vocab]."""
        device, vocab = logits.device, logits.shape[-1]
        values = self.floats[rows]
        temperature = values[:, _TEMPERATURE]
        # NaN, +inf or all -inf after the temperature (a NaN or vanishing one): no distribution to draw from.
        bad = ~torch.isfinite(logits.amax(-1) / temperature)
        u = uniform(self.ints[rows, _SEED], self.ints[rows, _LENGTH])
        tokens = torch.empty(len(params), dtype=torch.long, device=device)
        top_k = [j for j, p in enumerate(params) if 0 < p.top_k < vocab]
        sorted_p = [j for j, p in enumerate(params) if not 0 < p.top_k < vocab and p.top_p < 1.0]
        plain = [j for j, p in enumerate(params) if not 0 < p.top_k < vocab and p.top_p >= 1.0]
        for group in (top_k, sorted_p, plain):
            if not group:
                continue
            index = torch.tensor(group, device=device)
            x, t = logits[index], temperature[index].unsqueeze(1)
            if group is top_k:
                k = max(params[j].top_k for j in group)
                x, ids = torch.topk(x, k, -1)
                beyond = torch.arange(k, device=device) >= self.ints[rows[index], _TOP_K].unsqueeze(1)
                x = (x / t).masked_fill(beyond, float("-inf"))
            elif group is sorted_p:
                x, ids = torch.sort(x, -1, descending=True)
                x = x / t
            else:
                x, ids = x / t, None
            x = x.masked_fill(bad[index].unsqueeze(1), 0.0)  # a failed row draws anything, harmlessly
            top_p = values[index, _TOP_P] if group is not plain else None
            position = _draw(x, u[index], top_p)
            drawn = position if ids is None else ids.gather(1, position.unsqueeze(1)).squeeze(1)
            tokens.index_copy_(0, index, drawn)
        return tokens, bad

    @staticmethod
    def _logprobs(raw: torch.Tensor, tokens: torch.Tensor, asking: list[int], tops: list[int]) -> list[torch.Tensor]:
        """The asking rows' chosen logprobs [a], top logprobs [a * k] (as int32 bits, to travel with the
        tokens) and their ids [a * k], k the largest `tops`."""
        index = torch.tensor(asking, device=raw.device)
        logprobs = torch.log_softmax(raw[index], -1)
        chosen = logprobs.gather(1, tokens[index].unsqueeze(1)).squeeze(1)
        k = min(max(tops), logprobs.shape[-1])
        values, ids = torch.topk(logprobs, k, -1)
        return [chosen.view(torch.int32), values.reshape(-1).view(torch.int32), ids.reshape(-1).to(torch.int32)]

    def _advance(self, rows: torch.Tensor, tokens: torch.Tensor, sampled: torch.Tensor, penalised: list[int]) -> None:
        """The rows that sampled are a token longer, and their counts have it."""
        self.ints[:, _LENGTH].index_put_((rows,), sampled.long(), accumulate=True)
        if penalised:
            index = torch.tensor(penalised, device=rows.device)
            self.counts.index_put_((self.ints[rows[index], _PENALTY_ROW], tokens[index]),
                                   sampled[index].to(self.counts.dtype), accumulate=True)

    @staticmethod
    def _results(host: torch.Tensor, n: int, asking: list[int], params: list[SamplingParams]) -> list[Sampled]:
        tokens, codes = host[:n].tolist(), host[n:2 * n].tolist()
        measured: dict[int, TokenLogprob] = {}
        if asking:
            a, k = len(asking), (len(host) - 2 * n - len(asking)) // (2 * len(asking))
            chosen = host[2 * n:2 * n + a].view(torch.float32).tolist()
            values = host[2 * n + a:2 * n + a + a * k].view(torch.float32).view(a, k).tolist()
            ids = host[2 * n + a + a * k:].view(a, k).tolist()
            for i, j in enumerate(asking):
                top = params[j].top_logprobs
                measured[j] = TokenLogprob(tokens[j], chosen[i], tuple(zip(ids[i][:top], values[i][:top], strict=True)))
        return [Sampled(None, _ERRORS[code]) if code else Sampled(tokens[j], None, measured.get(j))
                for j, code in enumerate(codes)]

    def _resize(self, vocab: int) -> None:
        """The model's logits are wider (or narrower) than its configuration said: the counts follow them."""
        for name in ("counts", "prompt_seen"):
            table = getattr(self, name)
            if table is not None:
                resized = torch.zeros(table.shape[0], vocab, dtype=table.dtype, device=table.device)
                width = min(vocab, self.vocab)
                resized[:, :width] = table[:, :width]
                setattr(self, name, resized)
        self.vocab = vocab


class FormatMasks:
    """Response formats' masks: each constraint (structured_output.Constraint) writes its bitmask, a bit a
    token, into one row of a host buffer (pinned for a GPU), copied to the device at once and expanded
    there."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pinned = device.type == "cuda"
        self.buffer: torch.Tensor | None = None
        self.bits = torch.arange(32, dtype=torch.int32, device=device)
        self._copied: Any = None  # the event after the last copy from the buffer, which must end before a rewrite

    def apply(self, logits: torch.Tensor, rows: list[int], constraints: list) -> tuple[torch.Tensor, torch.Tensor]:
        """(`logits` [n, vocab] with every token each of `rows` may not produce next set to -inf, a copy;
        [n] bool: the rows whose format allows nothing)."""
        n, vocab = len(rows), logits.shape[-1]
        words = (vocab + 31) // 32
        if self.buffer is None or self.buffer.shape[0] < n or self.buffer.shape[1] != words:
            self.buffer = torch.empty(max(n, 8), words, dtype=torch.int32, pin_memory=self.pinned)
        elif self._copied is not None:
            self._copied.synchronize()
        for j, constraint in enumerate(constraints):
            constraint.write_mask(self.buffer[j])
        masks = self.buffer[:n].to(self.device, non_blocking=self.pinned)
        if self.pinned:
            self._copied = torch.cuda.Event()
            self._copied.record()
        allowed = ((masks.unsqueeze(-1) >> self.bits) & 1).view(n, -1)[:, :vocab].bool()
        index = torch.tensor(rows, device=logits.device)
        blocked = torch.zeros(len(logits), dtype=torch.bool, device=logits.device)
        blocked[index] = ~allowed.any(-1)
        return logits.index_copy(0, index, logits[index].masked_fill(~allowed, float("-inf"))), blocked
