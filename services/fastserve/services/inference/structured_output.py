"""Structured output: a response format (JSON, or JSON fitting a schema) compiled into a per-step token mask.

A format becomes a regex (outlines-core's `build_regex_from_schema`), the regex a DFA walked over the model's
vocabulary (`outlines_core.Index`: for each DFA state, the tokens allowed and the state each leads to), and a
sequence's place in it a `Constraint` (an `outlines_core.Guide`) that writes the allowed-token bitmask of each
step and advances on the sampled token. An `Index` depends only on the regex and the vocabulary, so it is
compiled once per (model, schema) and shared by every request using it (an LRU keyed by regex, per model);
a Constraint is a few integers per sequence.

The vocabulary maps each token's bytes (what the detokenizer makes of it) to its ids. Those bytes come from
the tokenizer's decoder, not guessed per token: byte-level BPE (GPT-2) maps each character of a token back
through GPT-2's byte-to-unicode table; SentencePiece (a Metaspace decoder, or Llama's `Replace("▁", " ")`)
reads `▁` as a space and, with byte fallback, `<0xNN>` as that byte. Added and special tokens, ids the
model cannot emit (at or above its vocabulary size) and tokens of no bytes are left out, so they are never
allowed; EOS is allowed only where the format may end. A WordPiece or decoder-less tokenizer is refused:
its detokenizer joins tokens with spaces chosen by context, so no token has bytes of its own.

Bounds. The regex is compiled to a DFA (regex-automata: no backtracking), but a DFA can still be huge, and
outlines-core gives it no size limit; its Index costs about (DFA states x vocabulary). Measured on this
2-core machine (busy with other work) with a byte-level BPE of 300 tokens / one of 50,000:

    outlines-core's {"type": "object"} (a 6,900-char regex)    4.9 s / 15.3 s, ~3 GiB peak at 50k
    JSON mode's own, two levels (a 1,600-character regex)      0.1 s / 1.4 s
    3 properties (string maxLength 20, integer, boolean enum)  0.01 s / 0.36 s
    8 optional objects of 4 optional integers (16,046 chars)   0.04 s / 0.50 s
    array of integers, maxItems 50 / 256                           - / 0.28 s, 2.2 s
    string maxLength 100 / 256 / 500                               - / 0.93 s, 6.0 s (276 MiB), 8.9 s (383 MiB)
    string maxLength 5000                                      0.78 s / 206 s, 3.3 GiB

Counted repetitions are what blow up (each count is a DFA state), and nested ones multiply, so a regex
whose nested counts multiply past MAX_REPETITION (256: a few seconds at 50k tokens) is refused, as is one
longer than MAX_REGEX_CHARS. Past those static bounds (a pattern like `(a|b)*a(a|b){20}` determinizes to
2^20 states), compiles run on a small pool (COMPILE_WORKERS threads) and a request waits at most
COMPILE_TIMEOUT_S: then it is refused as too complex, or as the compiler being busy if its compile never
started. Python cannot stop a running Rust call, so a timed-out compile runs on to its end in its worker
(its result is cached all the same); the pool's size is what bounds how many can run at once. Index
construction releases the GIL (measured: a Python thread counting in a loop kept counting at 40-100% of its
solo rate through a 15 s compile, the rest being the other core's load), so a compile does not stall the
engine's loop. Concurrent requests for the same schema share one compile.

This module imports no torch nor numpy (the lint contract on the generation scheduler's modules would
allow it next to them): a mask row is written through its data pointer.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import json
import os
import re
import subprocess
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import outlines_core
from outlines_core.json_schema import build_regex_from_schema
from tokenizers import Tokenizer

from fastserve.runtime.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, error_gist

MAX_SCHEMA_BYTES = 65536
MAX_REGEX_CHARS = 65536  # 16,046 characters compiled in 0.5 s at 50k tokens; the cost is the counts, not length
MAX_REPETITION = 256  # the product of nested counted repetitions (maxLength, maxItems, a pattern's {n,m})
COMPILE_TIMEOUT_S = 60.0  # above json_object at 128k tokens (~40 s on this machine, scaled from 15 s at 50k)
COMPILE_WORKERS = 2
REGEX_CHILD_BYTES = 1 << 30  # the address space of the child that builds a schema's regex
REGEX_TIMEOUT_S = 10.0
FORMAT_TYPES = ("text", "json_object", "json_schema")
# JSON mode: an object whose values are scalars, arrays of scalars or objects of scalars. outlines-core's own
# {"type": "object"} nests three deep in a 6,900-character regex that took 15.3 s and ~3.4 GiB to compile at
# 50k tokens; this one (1,600 characters) took 1.4 s there, 0.1 s at 300. Fixed: built here, not in a child.
_SCALAR = {"anyOf": [{"type": "string"}, {"type": "number"}, {"type": "boolean"}, {"type": "null"}]}
_JSON_OBJECT_SCHEMA = {"type": "object", "additionalProperties": {"anyOf": [
    _SCALAR, {"type": "array", "items": _SCALAR}, {"type": "object", "additionalProperties": _SCALAR}]}}
_JSON_OBJECT_REGEX = build_regex_from_schema(json.dumps(_JSON_OBJECT_SCHEMA))
_TOO_COMPLEX = "the schema is too complex to compile"


@dataclass(frozen=True)
class ResponseFormat:
    type: str = "text"  # "text" | "json_object" | "json_schema"
    json_schema: str = ""  # JSON text, only for "json_schema"

    @property
    def constrained(self) -> bool:
        return self.type != "text"

    def validate(self, field: str = "sampling.response_format") -> ResponseFormat:
        """Self, or InvalidArgument naming `{field}.type` or `{field}.json_schema`. Whether the library can
        compile the schema is `Grammars.compile`'s to say."""
        if self.type not in FORMAT_TYPES:
            raise InvalidArgument(f"response format type must be one of {', '.join(FORMAT_TYPES)}, got "
                                  f"{self.type[:40]!r}", field=f"{field}.type")
        schema_field = f"{field}.json_schema"
        if self.type != "json_schema":
            if self.json_schema:
                raise InvalidArgument(f"a json_schema is only read with type json_schema, not {self.type}",
                                      field=schema_field)
            return self
        if not self.json_schema:
            raise InvalidArgument("type json_schema needs a json_schema", field=schema_field)
        size = len(self.json_schema.encode("utf-8"))
        if size > MAX_SCHEMA_BYTES:
            raise InvalidArgument(f"json_schema is {size} bytes; at most {MAX_SCHEMA_BYTES}", field=schema_field)
        try:
            schema = json.loads(self.json_schema)
        except (ValueError, RecursionError) as exc:
            raise InvalidArgument(f"json_schema is not valid JSON: {error_gist(exc, 200)}",
                                  field=schema_field) from None
        if not isinstance(schema, dict):
            raise InvalidArgument(f"json_schema must be a JSON object, got a {type(schema).__name__}",
                                  field=schema_field)
        return self


class Grammar:
    """A format compiled for one model's vocabulary: immutable, shared by every request that asks for it."""

    __slots__ = ("regex", "_index", "_eos", "_only_eos")

    def __init__(self, regex: str, index: outlines_core.Index, eos_token_id: int) -> None:
        self.regex, self._index, self._eos = regex, index, eos_token_id
        self._only_eos: dict[int, bool] = {}  # state -> whether EOS is all it allows (a benign race: same value)

    def constraint(self) -> Constraint:
        return Constraint(self)

    def _ends_at(self, guide: outlines_core.Guide) -> bool:
        state = guide.get_state()
        ends = self._only_eos.get(state)
        if ends is None:
            # Only final states can allow EOS, so the token list is read for those alone (short: the end of a
            # JSON value allows little more than EOS).
            ends = self._index.is_final_state(state) and guide.get_tokens() == [self._eos]
            self._only_eos[state] = ends
        return ends


class Constraint:
    """One sequence's place in a Grammar. Not thread-safe: a sequence is stepped by one thread at a time."""

    __slots__ = ("_grammar", "_guide", "_ended")

    def __init__(self, grammar: Grammar) -> None:
        self._grammar = grammar
        self._guide = outlines_core.Guide(grammar._index)
        self._ended = False  # EOS was taken: outlines-core's Guide has no state after EOS

    @property
    def finished(self) -> bool:
        """The format is complete: EOS was taken, or it is all that may come next."""
        return self._ended or self._grammar._ends_at(self._guide)

    def write_mask(self, row: Any) -> None:
        """Write the allowed-token bitmask (bit t % 32 of word t // 32) into `row`: a contiguous 1-D int32
        torch tensor on the CPU, or numpy array, of at least ceil(vocab / 32) words; words past the
        vocabulary's are cleared. The engine copies it to the device itself: a device pointer here would
        be written as host memory."""
        pointer, words = _int32_buffer(row)
        if self._ended:
            eos = self._grammar._eos
            if eos // 32 >= words:
                raise ValueError(f"the mask row has {words} words, too few for token {eos}")
            ctypes.memset(pointer, 0, 4 * words)
            ctypes.c_uint32.from_address(pointer + 4 * (eos // 32)).value = 1 << (eos % 32)
            return
        self._guide.write_mask_into(pointer, words, 4)

    def advance(self, token_id: int) -> None:
        """Take `token_id`, or ValueError (the state unchanged) if the format does not allow it here."""
        if self._ended:
            raise ValueError(f"token {token_id} after the end of the constrained output")
        if token_id == self._grammar._eos:
            if not self._grammar._index.is_final_state(self._guide.get_state()):
                raise ValueError("EOS before the constrained output is complete")
            self._ended = True
            return
        try:
            self._guide.advance(token_id, return_tokens=False)
        except ValueError:
            raise ValueError(f"token {token_id} is not allowed by the response format here") from None


def _int32_buffer(row: Any) -> tuple[int, int]:
    """(data pointer, element count) of a contiguous int32 host buffer, read without importing its library."""
    if hasattr(row, "data_ptr"):  # torch
        if str(row.dtype) != "torch.int32" or row.dim() != 1 or not row.is_contiguous():
            raise ValueError(f"the mask row must be a contiguous 1-D int32 tensor, got {row.dtype} {tuple(row.shape)}")
        if row.device.type != "cpu":
            raise ValueError(f"the mask row must be in host memory, not on {row.device}")
        return row.data_ptr(), row.numel()
    if hasattr(row, "__array_interface__"):  # numpy
        if row.dtype.str not in ("<i4", "=i4", "|i4") or row.ndim != 1 or not row.flags.c_contiguous:
            raise ValueError(f"the mask row must be a contiguous 1-D int32 array, got {row.dtype} {row.shape}")
        if not row.flags.writeable:
            raise ValueError("the mask row is read-only")
        return row.ctypes.data, row.size
    raise TypeError(f"the mask row must be a torch tensor or numpy array, got {type(row).__name__}")


class Grammars:
    """One served model's compiled formats: its vocabulary (built on first use) and an LRU of Indexes."""

    def __init__(self, tokenizer: Tokenizer, eos_token_id: int | None, vocab_size: int, cache_size: int = 64) -> None:
        self.tokenizer, self.eos_token_id, self.vocab_size = tokenizer, eos_token_id, vocab_size
        self.cache_size = cache_size
        self._lock = threading.Lock()
        self._vocabulary: outlines_core.Vocabulary | None = None
        self._vocabulary_error: FailedPrecondition | None = None
        self._cache: OrderedDict[str, concurrent.futures.Future] = OrderedDict()  # regex -> its Index
        self._regexes: OrderedDict[str, str] = OrderedDict()  # schema text -> regex

    def compile(self, fmt: ResponseFormat, field: str = "sampling.response_format") -> Grammar | None:
        """The Grammar of `fmt`, None for text. FailedPrecondition (naming `field`) if this model cannot be
        constrained; InvalidArgument (naming `{field}.json_schema`) for a schema the library refuses or
        the bounds do (module docstring); ResourceExhausted when the compilers stay busy too long."""
        fmt.validate(field)
        if not fmt.constrained:
            return None
        if self.eos_token_id is None:
            raise FailedPrecondition("structured output needs a model with an EOS token", field=field)
        schema_field = f"{field}.json_schema"
        regex = _JSON_OBJECT_REGEX if fmt.type == "json_object" else self._regex(fmt.json_schema, schema_field)
        _check_bounds(regex, schema_field)
        vocabulary = self._vocabulary_for(field)
        return Grammar(regex, self._index(regex, vocabulary, schema_field), self.eos_token_id)

    def _regex(self, schema: str, field: str) -> str:
        with self._lock:
            regex = self._regexes.get(schema)
            if regex is not None:
                self._regexes.move_to_end(schema)
                return regex
        regex = schema_regex(schema, field)
        with self._lock:
            self._regexes[schema] = regex
            while len(self._regexes) > self.cache_size:
                self._regexes.popitem(last=False)
        return regex

    def _vocabulary_for(self, field: str) -> outlines_core.Vocabulary:
        with self._lock:
            if self._vocabulary is None and self._vocabulary_error is None:
                try:
                    self._vocabulary = outlines_core.Vocabulary(
                        self.eos_token_id, token_bytes(self.tokenizer, self.eos_token_id, self.vocab_size))
                except _Unsupported as exc:
                    self._vocabulary_error = FailedPrecondition(str(exc))
            if self._vocabulary_error is not None:
                raise FailedPrecondition(self._vocabulary_error.message, field=field)
            return self._vocabulary

    def _index(self, regex: str, vocabulary: outlines_core.Vocabulary, field: str) -> outlines_core.Index:
        with self._lock:
            future = self._cache.get(regex)
            if future is None:
                future = _compiler().submit(outlines_core.Index, regex, vocabulary)
                self._cache[regex] = future
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(regex)
        try:
            return future.result(timeout=COMPILE_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            if future.cancel():  # it never started: the workers are busy with others
                self._forget(regex, future)
                raise ResourceExhausted("the structured-output compiler is busy; retry later", field=field) from None
            raise InvalidArgument(f"{_TOO_COMPLEX} (over {COMPILE_TIMEOUT_S:g} s)", field=field) from None
        except concurrent.futures.CancelledError:  # another waiter gave up on it before it started
            raise ResourceExhausted("the structured-output compiler is busy; retry later", field=field) from None
        except ValueError as exc:  # the regex needs a token the vocabulary lacks, or the DFA cannot be built
            self._forget(regex, future)
            raise InvalidArgument(f"json_schema cannot be compiled for this model: {error_gist(exc, 200)}",
                                  field=field) from None

    def _forget(self, regex: str, future: concurrent.futures.Future) -> None:
        with self._lock:
            if self._cache.get(regex) is future:
                del self._cache[regex]


_COMPILER: concurrent.futures.ThreadPoolExecutor | None = None
_COMPILER_LOCK = threading.Lock()


def _compiler() -> concurrent.futures.ThreadPoolExecutor:
    """One pool for the process: compiles compete for the same cores whichever model asks."""
    global _COMPILER
    with _COMPILER_LOCK:
        if _COMPILER is None:
            _COMPILER = concurrent.futures.ThreadPoolExecutor(COMPILE_WORKERS, thread_name_prefix="grammar")
        return _COMPILER


# A schema's regex is built in a child process: outlines-core's builder has no size limit, and a tiny
# schema can ask for an exponential regex (each level of nested arrays doubles it: 25 levels ask for
# 1.6 GB, and a Rust allocation failure aborts the whole process). The child's address space is capped,
# so such a schema costs one child's crash.
_REGEX_CHILD = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
from outlines_core.json_schema import build_regex_from_schema
try:
    regex = build_regex_from_schema(sys.stdin.read())
except Exception as exc:
    sys.stdout.write("E" + str(exc))
else:
    sys.stdout.write("R" + regex if len(regex) <= {most} else "L%d" % len(regex))
"""


def schema_regex(schema: str, field: str) -> str:
    """outlines-core's regex for the JSON schema `schema`, built in a bounded child process; InvalidArgument
    naming `field` if the library refuses the schema or the bounds do."""
    code = _REGEX_CHILD.format(limit=REGEX_CHILD_BYTES, most=MAX_REGEX_CHARS)
    try:
        done = subprocess.run([sys.executable, "-I", "-c", code], input=schema, capture_output=True, text=True,
                              encoding="utf-8", timeout=REGEX_TIMEOUT_S,
                              env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    except subprocess.TimeoutExpired:
        raise InvalidArgument(f"{_TOO_COMPLEX}: its regex takes over {REGEX_TIMEOUT_S:g} s to build",
                              field=field) from None
    kind, text = done.stdout[:1], done.stdout[1:]
    if done.returncode != 0 or not kind:
        raise InvalidArgument(f"{_TOO_COMPLEX}: building its regex ran out of memory", field=field)
    if kind == "E":
        raise InvalidArgument(f"json_schema cannot be used: {error_gist(Exception(text), 200)}", field=field)
    if kind == "L":
        raise InvalidArgument(f"{_TOO_COMPLEX}: its regex has {text} characters; at most {MAX_REGEX_CHARS}",
                              field=field)
    return text


_COUNT = re.compile(r"\{(\d+)(?:,(\d*))?\}")


def _check_bounds(regex: str, field: str) -> None:
    if len(regex) > MAX_REGEX_CHARS:
        raise InvalidArgument(f"{_TOO_COMPLEX}: its regex has {len(regex)} characters; at most {MAX_REGEX_CHARS}",
                              field=field)
    repetition = nested_repetition(regex)
    if repetition > MAX_REPETITION:
        raise InvalidArgument(f"{_TOO_COMPLEX}: its counted repetitions (maxLength, maxItems, {{n,m}} in a pattern) "
                              f"nest to {repetition}; at most {MAX_REPETITION}", field=field)


def nested_repetition(regex: str) -> int:
    """The largest product of nested counted repetitions in `regex` (`(a{0,20}){0,50}`: 1000), the number
    of DFA states they unroll to. Escapes and character classes are skipped; `{` that opens no count is
    a literal, as in the regex syntax."""
    groups = [1]  # per open group: the largest product inside it so far
    last = 1  # the product inside the atom just read
    i, n = 0, len(regex)
    while i < n:
        c = regex[i]
        if c == "\\":
            i, last = i + 2, 1
            continue
        if c == "[":
            i = _class_end(regex, i)
            last = 1
            continue
        if c == "(":
            groups.append(1)
        elif c == ")" and len(groups) > 1:
            last = groups.pop()
            groups[-1] = max(groups[-1], last)
        elif c == "{" and (count := _COUNT.match(regex, i)):
            low, high = count.group(1), count.group(2)
            last *= int(low) if high is None else int(high) if high else int(low) + 1  # {n} / {n,m} / {n,}
            groups[-1] = max(groups[-1], last)
            i = count.end()
            continue
        else:
            last = 1
        i += 1
    return max(groups)


def _class_end(regex: str, start: int) -> int:
    """The index just past the character class opening at `start`."""
    i = start + 1
    if i < len(regex) and regex[i] == "^":
        i += 1
    if i < len(regex) and regex[i] == "]":  # a leading `]` is a member
        i += 1
    while i < len(regex) and regex[i] != "]":
        i += 2 if regex[i] == "\\" else 1
    return i + 1


class _Unsupported(Exception):
    """A tokenizer whose tokens have no bytes of their own."""


def _gpt2_bytes() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: printable bytes stand for themselves, the other 68 were
    shifted to code points from 256 up, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in printable}
    shifted = (b for b in range(256) if b not in table.values())
    table.update({chr(256 + k): b for k, b in enumerate(shifted)})
    return table


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _decoders(spec: dict | None) -> list[dict]:
    """The decoder and, for a Sequence, each of its steps."""
    if not spec:
        return []
    return [spec, *(d for step in spec.get("decoders") or [] for d in _decoders(step))]


def token_bytes(tokenizer: Tokenizer, eos_token_id: int | None, vocab_size: int) -> dict[bytes, list[int]]:
    """Each token's bytes -> its ids, for outlines_core.Vocabulary: EOS, added and special tokens, ids at
    or above `vocab_size` and tokens of no bytes are left out."""
    decoders = _decoders(json.loads(tokenizer.to_str()).get("decoder"))
    kinds = {d["type"] for d in decoders}
    if "ByteLevel" in kinds:
        table = _gpt2_bytes()

        def to_bytes(token: str) -> bytes:
            # A character outside the alphabet is what the decoder passes through: its UTF-8.
            return b"".join(bytes([table[c]]) if c in table else c.encode("utf-8") for c in token)
    elif "Metaspace" in kinds or any(d["type"] == "Replace" and d.get("content") == " " for d in decoders):
        spaces = {d.get("replacement", "▁") for d in decoders if d["type"] == "Metaspace"}
        spaces |= {d["pattern"].get("String") for d in decoders
                   if d["type"] == "Replace" and d.get("content") == " " and isinstance(d.get("pattern"), dict)}
        spaces.discard(None)
        fallback = "ByteFallback" in kinds

        def to_bytes(token: str) -> bytes:
            if fallback and (byte := _BYTE_FALLBACK.fullmatch(token)):
                return bytes([int(byte.group(1), 16)])
            for space in spaces:
                token = token.replace(space, " ")
            return token.encode("utf-8")
    else:
        raise _Unsupported("structured output needs a byte-level BPE or SentencePiece tokenizer; this model's "
                           f"decoder is {', '.join(sorted(kinds)) or 'none'}")
    added = set(tokenizer.get_added_tokens_decoder())
    vocabulary: dict[bytes, list[int]] = {}
    for token, token_id in tokenizer.get_vocab(with_added_tokens=False).items():
        if token_id in added or token_id == eos_token_id or token_id >= vocab_size:
            continue
        if data := to_bytes(token):
            vocabulary.setdefault(data, []).append(token_id)
    return vocabulary
