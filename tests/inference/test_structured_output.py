"""Structured output on real tokenizers (a byte-level BPE and a SentencePiece Unigram, trained on the stdlib
docstrings): random walks through the mask yield JSON that fits its schema, the vocabulary's bytes match the
tokenizer's decoding, and the bounds refuse what would blow up the compiler."""

from __future__ import annotations

import json
import random

import jsonschema
import numpy as np
import pytest
import torch

from fastserve.corpora.stdlib import stdlib_documents
from fastserve.runtime.errors import FailedPrecondition, InvalidArgument
from fastserve.services.inference.structured_output import (
    MAX_SCHEMA_BYTES,
    Grammars,
    ResponseFormat,
    nested_repetition,
    token_bytes,
)
from fastserve.services.preprocessing.tokenizer_training import TokenizerSpec, train_tokenizer
from tests.support.rpc import field_of

FIELD = "sampling.response_format"
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer"},
                                           "ok": {"type": "boolean", "enum": [True]}},
          "required": ["name", "age", "ok"]}


@pytest.fixture(scope="module")
def texts():
    return [d["text"] for d in stdlib_documents(seed=0, max_documents=300)]


@pytest.fixture(scope="module")
def bpe(texts):
    return train_tokenizer(TokenizerSpec("bpe", 400, special_tokens=("<|im_start|>", "<|im_end|>")), iter(texts),
                           length=len(texts))


@pytest.fixture(scope="module")
def unigram(texts):
    return train_tokenizer(TokenizerSpec("unigram", 400), iter(texts), length=len(texts))


@pytest.fixture(scope="module")
def bpe_grammars(bpe):
    return Grammars(bpe, bpe.token_to_id("<|endoftext|>"), bpe.get_vocab_size())


def _schema(schema: dict) -> ResponseFormat:
    return ResponseFormat("json_schema", json.dumps(schema))


@pytest.mark.parametrize(("fmt", "field", "words"), [
    (ResponseFormat("xml"), f"{FIELD}.type", "must be one of"),
    (ResponseFormat("json_schema"), f"{FIELD}.json_schema", "needs a json_schema"),
    (ResponseFormat("json_object", "{}"), f"{FIELD}.json_schema", "only read with type json_schema"),
    (ResponseFormat("json_schema", "{"), f"{FIELD}.json_schema", "not valid JSON"),
    (ResponseFormat("json_schema", "[1]"), f"{FIELD}.json_schema", "must be a JSON object"),
    (ResponseFormat("json_schema", json.dumps({"description": "x" * MAX_SCHEMA_BYTES})), f"{FIELD}.json_schema",
     "at most 65536"),
])
def test_validation_names_the_field(fmt, field, words):
    with pytest.raises(InvalidArgument, match=words) as caught:
        fmt.validate()
    assert field_of(caught.value) == field


def test_valid_formats_pass():
    assert not ResponseFormat().validate().constrained
    assert ResponseFormat("json_object").validate().constrained
    assert _schema(PERSON).validate("r").json_schema


def _allowed(constraint, words: int) -> list[int]:
    row = np.zeros(words, dtype=np.int32)
    constraint.write_mask(row)
    bits = np.unpackbits(row.view(np.uint8), bitorder="little")
    return np.flatnonzero(bits).tolist()


def _walk(grammar, tokenizer, eos: int, vocab: int, seed: int) -> bytes:
    """A random path through the constraint until only EOS is allowed; closing tokens are favoured so
    that the walk ends."""
    rng = random.Random(seed)
    pieces = {i: data for data, ids in token_bytes(tokenizer, eos, vocab).items() for i in ids}
    specials = set(tokenizer.get_added_tokens_decoder()) - {eos}
    constraint, out = grammar.constraint(), b""
    for _ in range(3000):
        allowed = _allowed(constraint, (vocab + 31) // 32)
        assert allowed and not specials & set(allowed)
        if constraint.finished:
            assert allowed == [eos]
            return out
        if eos in allowed and rng.random() < 0.5:
            constraint.advance(eos)
            assert constraint.finished and _allowed(constraint, (vocab + 31) // 32) == [eos]
            return out
        closing = [t for t in allowed if t != eos and any(c in pieces[t] for c in b'"}]0123456789')]
        token = rng.choice(closing if closing and rng.random() < 0.7 else allowed)
        if token == eos:
            continue
        constraint.advance(token)
        out += pieces[token]
    raise AssertionError(f"the walk did not end: {out[:200]!r}")


@pytest.mark.parametrize("tokenizer_name", ["bpe", "unigram"])
@pytest.mark.parametrize("schema", [None, PERSON])
def test_random_walks_give_json_that_fits_the_schema(request, tokenizer_name, schema):
    tokenizer = request.getfixturevalue(tokenizer_name)
    eos = tokenizer.token_to_id("<|endoftext|>" if tokenizer_name == "bpe" else "</s>")
    vocab = tokenizer.get_vocab_size()
    grammars = Grammars(tokenizer, eos, vocab)
    grammar = grammars.compile(ResponseFormat("json_object") if schema is None else _schema(schema))
    for seed in range(5):
        value = json.loads(_walk(grammar, tokenizer, eos, vocab, seed).decode("utf-8"))
        jsonschema.validate(value, schema or {"type": "object"})


def test_advance_refuses_a_disallowed_token(bpe, bpe_grammars):
    constraint = bpe_grammars.compile(_schema(PERSON)).constraint()
    vocab = bpe.get_vocab_size()
    before = _allowed(constraint, (vocab + 31) // 32)
    refused = next(t for t in range(vocab) if t not in before and t != bpe_grammars.eos_token_id)
    with pytest.raises(ValueError, match="not allowed"):
        constraint.advance(refused)
    with pytest.raises(ValueError, match="EOS before"):
        constraint.advance(bpe_grammars.eos_token_id)
    assert _allowed(constraint, (vocab + 31) // 32) == before
    constraint.advance(bpe.token_to_id("{"))
    assert not constraint.finished


def test_the_mask_fits_a_padded_vocabulary_and_torch_rows(bpe):
    eos = bpe.token_to_id("<|endoftext|>")
    padded = Grammars(bpe, eos, bpe.get_vocab_size() + 100).compile(ResponseFormat("json_object")).constraint()
    row = torch.full(((bpe.get_vocab_size() + 131) // 32,), -1, dtype=torch.int32)
    padded.write_mask(row)
    as_numpy = np.full(row.numel(), -1, dtype=np.int32)
    padded.write_mask(as_numpy)
    assert row.tolist() == as_numpy.tolist() and row[-3:].tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="int32"):
        padded.write_mask(torch.zeros(row.numel(), dtype=torch.int64))
    # A model vocabulary smaller than the tokenizer's: the ids it cannot emit are never allowed.
    cut = bpe.get_vocab_size() - 50
    small = Grammars(bpe, eos, cut).compile(ResponseFormat("json_object")).constraint()
    assert max(_allowed(small, (bpe.get_vocab_size() + 31) // 32)) < cut


def test_the_cache_shares_one_index(bpe_grammars):
    first = bpe_grammars.compile(_schema(PERSON))
    again = bpe_grammars.compile(ResponseFormat("json_schema", json.dumps(PERSON, indent=2)))
    assert first is not again and first._index is again._index
    assert bpe_grammars.compile(ResponseFormat()) is None


def test_without_eos_structured_output_is_refused(bpe):
    with pytest.raises(FailedPrecondition, match="EOS") as caught:
        Grammars(bpe, None, bpe.get_vocab_size()).compile(ResponseFormat("json_object"), field="response_format")
    assert field_of(caught.value) == "response_format"


def test_a_wordpiece_tokenizer_is_refused(texts):
    wordpiece = train_tokenizer(TokenizerSpec("wordpiece", 300), iter(texts), length=len(texts))
    with pytest.raises(FailedPrecondition, match="byte-level BPE or SentencePiece") as caught:
        Grammars(wordpiece, wordpiece.token_to_id("[SEP]"), 300).compile(ResponseFormat("json_object"))
    assert field_of(caught.value) == FIELD


@pytest.mark.parametrize("tokenizer_name", ["bpe", "unigram"])
def test_token_bytes_match_the_decoder(request, tokenizer_name):
    tokenizer = request.getfixturevalue(tokenizer_name)
    vocab = token_bytes(tokenizer, None, tokenizer.get_vocab_size())
    ids = {i: data for data, group in vocab.items() for i in group}
    anchor = tokenizer.token_to_id("a" if tokenizer_name == "bpe" else "▁a")
    checked = 0
    for token_id, data in ids.items():
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:  # part of a character: decode() would show U+FFFD
            continue
        # After another token, so that a SentencePiece decoder keeps the leading space.
        expected = tokenizer.decode([anchor]) + text
        assert tokenizer.decode([anchor, token_id]) == expected, tokenizer.id_to_token(token_id)
        checked += 1
    assert checked > 250
    assert not set(tokenizer.get_added_tokens_decoder()) & set(ids)
    spaced = "Ġthe" if tokenizer_name == "bpe" else "▁the"
    assert ids[tokenizer.token_to_id(spaced)] == b" the"


@pytest.mark.parametrize(("schema", "words"), [
    ({"type": "string", "maxLength": 5000}, "nest to 5000"),
    ({"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 50}, "nest to"),
    ({"type": "string", "pattern": "(ab{30}){30}"}, "nest to 900"),
    ({"type": "unknown"}, "cannot be used"),
    ({"type": "string", "pattern": "zz(q"}, "cannot be compiled"),
    # Each level of nested arrays doubles the regex: built in a bounded child, not in the server.
    (json.loads('{"type": "array", "items": ' * 26 + '{"type": "integer"}' + "}" * 26), "too complex"),
])
def test_bounds_refuse_schemas_that_would_blow_up(bpe_grammars, schema, words):
    with pytest.raises(InvalidArgument, match=words) as caught:
        bpe_grammars.compile(_schema(schema))
    assert field_of(caught.value) == f"{FIELD}.json_schema"


def test_nested_repetition():
    assert nested_repetition(r'"a{0,20}"') == 20
    assert nested_repetition(r"(a{0,20}[{}]){2,50}b{3}") == 1000
    assert nested_repetition(r"\{3\}[a{9}]x{,4}") == 1
    assert nested_repetition(r"(a{3})(b{4})") == 4
