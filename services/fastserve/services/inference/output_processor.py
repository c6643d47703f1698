"""From sampled tokens to what a caller sees: stop sequences, token timings, stream events, the text.

The scheduler ends sequences on what token ids alone decide (EOS, stop token ids, length); stop
sequences are text, so they are found here, where the tokenizer's `decode` is, and the engine tells
the scheduler to stop the sequence in the same step. Streams get each step's new tokens, then None;
`text_stream` and `final_text` turn them into text that never contains a stop sequence (while
streaming, the last characters that could still turn out to start one are held back until they cannot).
A sequence whose output cannot be processed (its detokenizing fails) fails alone: the engine ends it
with ERROR and its caller gets the error; so does one the runner failed. No torch here.

Logprobs (a sequence that asks has one per generated token) stay with the text: a completion's are those
of the tokens that make its text, so a stop sequence that cuts the text drops the logprobs of the tokens
wholly inside the cut part; a streamed piece carries those of its token ids, or, with stop sequences
(whose text is held back), those of the tokens whose text it completes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from fastserve.runtime.errors import Cancelled, DeadlineExceeded, FastServeError
from fastserve.services.inference.generation_metrics import EngineMetrics
from fastserve.services.inference.logprobs import Candidate, Logprob, TokenLogprob
from fastserve.services.inference.sequence import Finish, Sequence, SequenceUpdate

log = logging.getLogger(__name__)

Decode = Callable[[list[int]], str]
DECODE_FAILED = "the tokenizer could not decode the completion"


def decoded(decode: Decode, ids: list[int]) -> str:
    """`decode(ids)`, or a FastServeError (INTERNAL, with a message safe to show) when the tokenizer fails."""
    try:
        return decode(ids)
    except Exception as exc:  # noqa: BLE001 - a tokenizer's failure on one completion is that completion's
        log.warning("decoding %d tokens failed", len(ids), exc_info=True)
        raise FastServeError(DECODE_FAILED) from exc


class OutputProcessor:
    def __init__(self, decode: Decode, metrics: EngineMetrics) -> None:
        self.decode, self.metrics = decode, metrics

    def stopped(self, updates: list[SequenceUpdate]) -> tuple[list[SequenceUpdate], list[SequenceUpdate]]:
        """(updates whose new tokens complete one of their sequence's stop sequences, updates whose stop
        check failed): each sequence is checked on its own, so one that fails does not stop the others'."""
        stops, failed = [], []
        for u in updates:
            if not (u.token_ids and u.seq.params.stop_sequences):
                continue
            try:
                if self._hits_stop(u.seq):
                    stops.append(u)
            except FastServeError:
                failed.append(u)
        return stops, failed

    def _hits_stop(self, seq: Sequence) -> bool:
        stops = seq.params.stop_sequences
        # Only the tail can hold a new match; decoding it, not the whole completion, keeps this O(1) a token.
        tail = decoded(self.decode, seq.generated[-(4 * max(map(len, stops)) + 8):])
        return any(stop in tail for stop in stops)

    def publish(self, updates: list[SequenceUpdate]) -> None:
        """Record token timings and hand new tokens, then the end, to each sequence's stream."""
        now = time.monotonic()
        for u in updates:
            seq = u.seq
            if u.sampled:  # an EOS counts too: it is the token that came
                if seq.first_token is None:
                    seq.first_token = now
                    self.metrics.ttft.observe(now - seq.arrival)
                else:
                    self.metrics.itl.observe(now - seq.last_token)
                seq.last_token = now
            if u.token_ids or u.finish is not None:
                seq.events.put((seq.index, u.finish is not None))
            if u.finish is not None:
                seq.done.set()


@dataclass(frozen=True)
class Piece:
    """Text and token ids produced since the previous piece, and the logprobs that go with them (see the
    module docstring); `last` ends the stream."""

    text: str
    token_ids: list[int]
    last: bool
    logprobs: list[TokenLogprob] = ()


def raise_if_cut_short(seq: Sequence, deadline: float | None) -> None:
    if seq.finish is Finish.ERROR:
        raise FastServeError(f"generation failed: {seq.error}")  # INTERNAL, for this sequence alone
    if seq.finish is Finish.CANCELLED:
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceeded("the deadline passed before generation finished")
        raise Cancelled("generation was cancelled")


def final_text(seq: Sequence, decode: Decode) -> str:
    text = decoded(decode, seq.generated)
    if seq.finish is Finish.STOP:
        cuts = [text.find(s) for s in seq.params.stop_sequences if s in text]
        text = text[:min(cuts)] if cuts else text
    return text


def final_logprobs(seq: Sequence, decode: Decode, text: str) -> list[TokenLogprob]:
    """The logprobs of the tokens that make `text`, the completion's final text (final_text)."""
    return seq.logprobs[:_making(seq, decode, len(text))]


def _making(seq: Sequence, decode: Decode, length: int) -> int:
    """How many leading generated tokens make a final text of `length` characters: all of them unless a stop
    sequence cut the text; then those that start before the cut or end within it."""
    ids = seq.generated
    n = min(len(ids), len(seq.logprobs))
    if not (seq.params.logprobs and seq.finish is Finish.STOP and seq.params.stop_sequences):
        return n
    after = len(decoded(decode, ids[:n]))
    # The cut is in the tail (stops are found as tokens come), so this walks back over a few tokens.
    while n > 0 and after > length:
        before = len(decoded(decode, ids[:n - 1]))
        if before < length:
            break
        n, after = n - 1, before
    return n


def _completed(decode: Decode, ids: list[int], start: int, length: int) -> int:
    """`start` and the following tokens whose text ends within the first `length` characters: how many lead."""
    n = start
    while n < len(ids) and len(decoded(decode, ids[:n + 1])) <= length:
        n += 1
    return n


def named(logprobs: list[TokenLogprob], decode: Decode) -> list[Logprob]:
    """`logprobs` with each token's text (decoded alone)."""
    texts: dict[int, str] = {}

    def text(token: int) -> str:
        if token not in texts:
            texts[token] = decoded(decode, [token])
        return texts[token]

    return [Logprob(lp.token_id, text(lp.token_id), lp.logprob,
                    tuple(Candidate(t, text(t), value) for t, value in lp.top)) for lp in logprobs]


class _Follower:
    """One sequence's stream state: what of its text, ids and logprobs went out already."""

    def __init__(self, seq: Sequence, decode: Decode, deadline: float | None) -> None:
        self.seq, self.decode, self.deadline = seq, decode, deadline
        self.hold = max(map(len, seq.params.stop_sequences), default=1) - 1
        self.emitted, self.sent_ids, self.sent_logprobs, self.ended = "", 0, 0, False

    def advance(self, ended: bool) -> Piece | None:
        """The piece its new tokens make (None while they make nothing to send); `ended`: its end came."""
        seq, decode = self.seq, self.decode
        stops, asked = seq.params.stop_sequences, seq.params.logprobs
        self.ended = ended
        generated = seq.generated  # a token's logprob is in before the token (the scheduler's order)
        if ended:
            raise_if_cut_short(seq, self.deadline)
            text = final_text(seq, decode)
        else:
            text = decoded(decode, generated).rstrip("\ufffd")  # wait for a character's last bytes
            text = text[:max(len(text) - self.hold, 0)] if stops else text
        ids = generated[self.sent_ids:]
        if not (text.startswith(self.emitted) and (len(text) > len(self.emitted) or ids or ended)):
            return None
        if not asked:
            upto = self.sent_logprobs
        elif ended:
            upto = _making(seq, decode, len(text))
        elif stops:
            upto = _completed(decode, generated, self.sent_logprobs, len(text))
        else:
            upto = len(generated)
        piece = Piece(text[len(self.emitted):], ids, ended, seq.logprobs[self.sent_logprobs:upto])
        self.emitted, self.sent_ids = text, self.sent_ids + len(ids)
        self.sent_logprobs = max(upto, self.sent_logprobs)
        return piece


def text_stream(seqs: list[Sequence], decode: Decode, deadline: float | None) -> Iterator[tuple[int, Piece]]:
    """(index, piece) as tokens come: for each of a request's sequences (which share one event queue), every
    token the engine produced for it since its previous piece; each sequence's last piece has `last`."""
    followers = {seq.index: _Follower(seq, decode, deadline) for seq in seqs}
    events = seqs[0].events
    while not all(f.ended for f in followers.values()):
        batch = [events.get()]
        while not events.empty():
            batch.append(events.get())
        news: dict[int, bool] = {}
        for index, ended in batch:
            news[index] = news.get(index, False) or ended
        for index, ended in news.items():
            piece = followers[index].advance(ended)
            if piece is not None:
                yield index, piece
