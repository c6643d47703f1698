"""Generation requests: checked, tokenized, run on the engine, and turned back into text. No gRPC here.

A completion's text never contains a stop sequence; while streaming, the last characters that could
still turn out to start one are held back until they cannot (output_processor.py does both).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from fastserve.models.kinds import DECODER, SEQ2SEQ, model_kind
from fastserve.models.loading import AUTO, load_model, pick_device, torch_dtype
from fastserve.models.tokenizers import load_tokenizer
from fastserve.runtime.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument
from fastserve.services.inference.chat import Chat, open_chat_template
from fastserve.services.inference.decoder import open_decoder
from fastserve.services.inference.engine import Engine
from fastserve.services.inference.generation_settings import GenerationSettings
from fastserve.services.inference.logprobs import Logprob
from fastserve.services.inference.output_processor import (
    final_logprobs,
    final_text,
    named,
    raise_if_cut_short,
    text_stream,
)
from fastserve.services.inference.sampling_params import SamplingParams
from fastserve.services.inference.sequence import Finish, Sequence
from fastserve.services.inference.structured_output import Grammars


@dataclass(frozen=True)
class GenerationRequest:
    text: str | None = None  # exactly one of text, token_ids and chat
    token_ids: list[int] | None = None
    chat: Chat | None = None  # rendered by the model's chat template; its turn ends at the template's stop ids
    params: SamplingParams = SamplingParams()
    max_new_tokens_set: bool = False  # False: params.max_new_tokens is the default, fitted to the window
    priority: int = 0
    deadline: float | None = None  # time.monotonic()


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    queue_ms: float
    time_to_first_token_ms: float
    total_ms: float


@dataclass(frozen=True)
class Chunk:
    """A piece of a streamed completion; each completion's last has `finish`, and the stream's last `usage`
    (for all n). `logprobs`: with SamplingParams.logprobs, those that go with this piece (output_processor.py).
    `index`: which of the request's n completions it continues."""

    text: str
    token_ids: list[int]
    finish: Finish | None = None
    usage: Usage | None = None
    logprobs: list[Logprob] = ()
    index: int = 0


@dataclass(frozen=True)
class Completion:
    """One of a request's n completions, whole: logprobs are those of the tokens that make its text (empty
    unless asked for)."""

    index: int
    text: str
    token_ids: list[int]
    finish: Finish
    logprobs: list[Logprob]


class Generator:
    """A causal LM or an encoder-decoder served for generation: its tokenizer and its engine."""

    task = "generation"
    platform = "pytorch"

    def __init__(self, name: str, folder: Path, dtype: str, settings: GenerationSettings,
                 max_kv_bytes: float = math.inf) -> None:
        device = pick_device()
        # No dtype named: bf16 on a CUDA GPU with bf16, else fp32 (loading.auto_dtype); a name forces it.
        model_dtype = torch_dtype(dtype or AUTO, device)
        settings.check()
        # Anything asked to generate that is not an encoder-decoder is run as a causal LM.
        kind = SEQ2SEQ if model_kind(folder) == SEQ2SEQ else DECODER
        model = load_model(folder, kind, model_dtype, device)
        self.tokenizer = load_tokenizer(folder, field="model_uri")
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.chat_template = open_chat_template(folder, settings.chat_template)
        decoder = open_decoder(model)
        self.vocab_size, self.encoder_decoder = decoder.vocab_size, decoder.encoder_decoder
        eos_ids = _eos_ids(folder)
        self.engine = Engine(name, decoder, settings, eos_ids, self.decode, max_kv_bytes)
        self.grammars = Grammars(self.tokenizer, min(eos_ids, default=None), decoder.vocab_size)
        self.context = self.engine.context
        # An encoder's input has a window of its own; a decoder's prompt shares the window with the output.
        self.max_prompt = decoder.max_source if decoder.encoder_decoder else self.context - 1

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        if request.chat is not None:
            if self.chat_template is None:
                raise FailedPrecondition(f"model {self.engine.name} has no chat template: load it with one "
                                         "(config.generation.chat_template)", field="messages")
            ids, field = self.chat_template.prompt_ids(request.chat), "messages"
        elif request.token_ids is not None:
            ids, field = list(request.token_ids), "token_ids.ids"
            bad = next((i for i, t in enumerate(ids) if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise InvalidArgument(f"token id {ids[bad]} is outside the vocabulary of {self.vocab_size}",
                                      field=f"token_ids.ids[{bad}]")
        else:
            # An encoder's input carries its special tokens (T5's closing </s>); a decoder's prompt does not.
            ids = self.tokenizer.encode(request.text or "", add_special_tokens=self.encoder_decoder).ids
            field = "text"
        if not ids:
            raise InvalidArgument("the prompt is empty", field=field)
        if len(ids) > self.max_prompt:
            raise InvalidArgument(f"the prompt has {len(ids)} tokens, over the {self.max_prompt} this model "
                                  f"takes (its window is {self.context} and one token must be left to generate)",
                                  field=field)
        return ids

    def submit(self, request: GenerationRequest) -> list[Sequence]:
        """The request's sequences (one per completion, SamplingParams.n), queued on the engine."""
        params = request.params  # checked where the protocol built it (SamplingParams.validate)
        prompt = self.prompt_ids(request)
        if request.chat is not None:  # added after the check: the bound is on what a request asks for
            ends = params.stop_token_ids + self.chat_template.end_of_turn
            params = replace(params, stop_token_ids=tuple(dict.fromkeys(ends)))
        room = self.context - (1 if self.encoder_decoder else len(prompt))  # the window left to generate into
        if not request.max_new_tokens_set:
            params = replace(params, max_new_tokens=min(params.max_new_tokens, room))
        elif params.max_new_tokens > room:
            raise InvalidArgument(f"max_new_tokens {params.max_new_tokens} does not fit: {room} tokens are left "
                                  f"of the {self.context}-token window after the prompt",
                                  field="sampling.max_new_tokens")
        if params.response_format.constrained:  # compiled here, on the caller's thread, not in an engine step
            params = replace(params, grammar=self.grammars.compile(params.response_format))
        return self.engine.submit_group(prompt, params, request.priority, request.deadline)

    def complete(self, seqs: list[Sequence], deadline: float | None) -> tuple[list[Completion], Usage]:
        """Each completion whole, once all have ended, and their usage together."""
        for seq in seqs:
            timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            if not seq.done.wait(timeout):
                for s in seqs:
                    s.cancel()
                raise DeadlineExceeded("the deadline passed before generation finished")
            raise_if_cut_short(seq, deadline)
        completions = []
        for seq in seqs:
            text = final_text(seq, self.decode)
            logprobs = named(final_logprobs(seq, self.decode, text), self.decode)
            completions.append(Completion(seq.index, text, seq.generated, seq.finish, logprobs))
        return completions, usage(seqs)

    def stream(self, seqs: list[Sequence], deadline: float | None) -> Iterator[Chunk]:
        """Chunks as tokens come: for each completion, every token the engine produced since its previous chunk."""
        left = len(seqs)
        for index, piece in text_stream(seqs, self.decode, deadline):
            left -= piece.last
            seq = seqs[index]
            yield Chunk(piece.text, piece.token_ids, seq.finish if piece.last else None,
                        usage(seqs) if piece.last and not left else None, named(piece.logprobs, self.decode), index)

    def drain(self) -> None:
        self.engine.drain()


def usage(seqs: list[Sequence]) -> Usage:
    """A request's usage: its prompt once, the tokens of all its completions; its first token and its last."""
    first = seqs[0]
    ms = lambda t: 0.0 if t is None else (t - first.arrival) * 1e3  # noqa: E731
    earliest = min((s.first_token for s in seqs if s.first_token is not None), default=None)
    latest = max((s.finished for s in seqs if s.finished is not None), default=None)
    return Usage(first.prompt_tokens, sum(len(s.generated) for s in seqs), ms(first.started), ms(earliest),
                 ms(latest))


def _eos_ids(folder: Path) -> set[int]:
    for name in ("generation_config.json", "config.json"):
        path = folder / name
        if path.is_file():
            config = json.loads(path.read_text())
            if "eos_token_id" in config:  # generation_config.json wins, as in transformers' generate
                eos = config["eos_token_id"]
                return set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    return set()
