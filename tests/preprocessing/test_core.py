"""Preprocessing cores in process: corpus parsing, the stdlib corpus, tokenizers, dataset building."""

from __future__ import annotations

import collections

import numpy as np
import pytest
from transformers import AutoTokenizer

from fastserve.corpora.stdlib import stdlib_documents
from fastserve.runtime.errors import InvalidArgument
from fastserve.services.preprocessing.corpus import (
    MAX_LINE_CHARS,
    UploadHeader,
    capped,
    json_depth_exceeds,
    lines,
    parse_upload,
    publish_corpus,
)
from fastserve.services.preprocessing.dataset_builder import DatasetSpec, assign_splits, build_dataset
from fastserve.services.preprocessing.tokenizer_training import (
    TokenizerSpec,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)
from fastserve.storage.artifacts import ArtifactStore
from fastserve.storage.datasets import DatasetReader
from tests.support.rpc import field_of


@pytest.fixture(scope="module")
def stdlib():
    return stdlib_documents(seed=0)


def test_stdlib_corpus_is_labelled_and_repeatable(stdlib):
    labels = collections.Counter(d["label"] for d in stdlib)
    assert len(stdlib) > 3000 and {"email", "http", "asyncio", "json"} <= set(labels)
    assert not {"test", "idlelib"} & set(labels) and not any(label.startswith("_") for label in labels)
    assert all(len(d["text"]) >= 40 for d in stdlib)
    assert stdlib_documents(seed=0, max_documents=50) == stdlib[:50]
    assert stdlib_documents(seed=1, max_documents=50) != stdlib[:50]
    top = stdlib_documents(seed=0, top_labels=3)
    assert {d["label"] for d in top} == {label for label, _ in labels.most_common(3)}


def test_uploads_parse_across_chunk_boundaries():
    text = 'text,label\n"multi\nline ✓",a\nplain,b\n'.encode()
    chunks = [text[i:i + 3] for i in range(0, len(text), 3)]  # splits the 3-byte ✓ too
    docs = list(parse_upload(UploadHeader("c", "csv", "text", "label"), chunks))
    assert docs == [{"text": "multi\nline ✓", "label": "a"}, {"text": "plain", "label": "b"}]
    assert list(lines(["ab\ncd", "e\n", "f"])) == ["ab\n", "cde\n", "f"]
    plain = list(parse_upload(UploadHeader("p", "plain"), [b"one\n\n  two  \n"]))
    assert plain == [{"text": "one"}, {"text": "two"}]
    with pytest.raises(InvalidArgument) as info:
        list(parse_upload(UploadHeader("p", "plain"), [b"ok\n", b"caf\xc3"]))
    assert "ends inside a UTF-8 sequence" in info.value.message


@pytest.mark.parametrize("model", ["bpe", "wordpiece", "unigram"])
def test_each_tokenizer_model_trains_and_loads(tmp_path, stdlib, model):
    spec = TokenizerSpec(model, 600, ("<extra>",), lowercase=model == "wordpiece")
    tok = train_tokenizer(spec, (d["text"] for d in stdlib[:1500]), 1500)
    save_tokenizer(tok, spec, tmp_path)
    auto = AutoTokenizer.from_pretrained(str(tmp_path))
    text = "Return a new socket object."
    decoded = auto.decode(auto(text)["input_ids"], skip_special_tokens=True)
    assert decoded.replace(" ", "") == (text.lower() if spec.lowercase else text).replace(" ", "")
    assert "<extra>" in auto.all_special_tokens and len(auto) <= 600
    assert load_tokenizer(tmp_path).encode(text).ids == auto(text)["input_ids"]


def test_splits_are_exact_and_seeded():
    spec = DatasetSpec("causal_lm", 16, validation_fraction=0.1, test_fraction=0.2, seed=5)
    a = assign_splits(1000, spec)
    assert np.bincount(a, minlength=3).tolist() == [700, 100, 200]
    assert (assign_splits(1000, spec) == a).all()
    assert not (assign_splits(1000, DatasetSpec("causal_lm", 16, 0, 0.1, 0.2, seed=6)) == a).all()


def test_seq2seq_pairs(tmp_path):
    store = ArtifactStore(tmp_path / "a")
    docs = [{"text": f"translate {i} please", "target": f"traduire {i}"} for i in range(40)]
    corpus = publish_corpus(store, "pairs", docs, {})
    spec = TokenizerSpec("unigram", 120)
    tok = train_tokenizer(spec, (d["text"] + " " + d["target"] for d in docs * 5))
    dspec = DatasetSpec("seq2seq", max_length=12, max_target_length=6, validation_fraction=0.25, seed=1)
    with store.publish("datasets", "pairs") as draft:
        draft.metadata["dataset"] = build_dataset(corpus, tok, "tok", dspec, draft.path)
    artifact = store.resolve(draft.ref.uri)
    reader = DatasetReader(artifact.path, artifact.manifest["metadata"])
    train = reader.arrays("train")
    assert train["input_ids"].shape == (30, 12) and train["labels"].shape == (30, 6)
    eos = tok.token_to_id("</s>")
    for ids, n in zip(train["labels"], train["label_lengths"], strict=True):
        assert ids[n - 1] == eos and (ids[n:] == reader.info["pad_id"]).all()


def test_shards_bound_memory_and_reload(tmp_path, stdlib):
    store = ArtifactStore(tmp_path / "a")
    corpus = publish_corpus(store, "std", stdlib[:2000], {})
    tok = train_tokenizer(TokenizerSpec("bpe", 500), (d["text"] for d in stdlib[:2000]))
    seen = []
    with store.publish("datasets", "std") as draft:
        info = build_dataset(corpus, tok, "t", DatasetSpec("causal_lm", 64, validation_fraction=0.1), draft.path,
                             progress=lambda docs, read: seen.append((docs, read)), rows_per_shard=500)
        draft.metadata["dataset"] = info
    train = info["splits"]["train"]
    assert len(train["shards"]) == -(-train["rows"] // 500) > 2
    assert [s["rows"] for s in train["shards"][:-1]] == [500] * (len(train["shards"]) - 1)
    assert seen[-1] == (2000, corpus.file_bytes)
    reader = DatasetReader(store.resolve(draft.ref.uri).path, store.resolve(draft.ref.uri).manifest["metadata"])
    assert sum(len(s["input_ids"]) for s in reader.shards("train")) == train["rows"]
    assert isinstance(next(reader.shards("train"))["input_ids"], np.memmap)


def _upload_error(header: UploadHeader, chunks: list[bytes]) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as caught:
        list(parse_upload(header, chunks))
    return caught.value


def test_a_newline_free_upload_is_refused_at_the_line_cap_without_buffering_it():
    """Before, a line was accumulated whole (and re-copied per chunk) however long; now it stops at 1 MiB."""
    chunks = (b"x" * 65536 for _ in range(1024))  # 64 MiB, no newline: refused after the first 1 MiB
    error = _upload_error(UploadHeader("p", "plain"), chunks)
    assert field_of(error) == "chunk" and "line 1 " in str(error)
    assert list(lines(["a" * 10, "b\n" + "c" * 5], max_chars=11)) == ["a" * 10 + "b\n", "c" * 5]
    with pytest.raises(InvalidArgument):
        list(lines(["ok\n", "a" * 10, "b" * 2], max_chars=11))
    row = b'text\n"' + b"a\n" * (MAX_LINE_CHARS // 2 + 1) + b'"\n'  # one CSV row of short lines
    assert field_of(_upload_error(UploadHeader("c", "csv", "text"), [row])) == "chunk"


def test_whole_upload_is_capped():
    assert list(capped([b"ab", b"c"], max_bytes=3)) == [b"ab", b"c"]
    with pytest.raises(InvalidArgument) as caught:
        list(capped([b"ab", b"cd"], max_bytes=3))
    assert field_of(caught.value) == "chunk"


def test_deeply_nested_jsonl_is_refused_with_its_line_before_parsing():
    deep = b'{"text": "x", "n": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"
    error = _upload_error(UploadHeader("j", "jsonl", "text"), [b'{"text": "ok"}\n', deep])
    assert field_of(error) == "chunk" and "line 2 " in str(error)
    fine = b'{"text": "[[[[", "n": ' + b"[" * 63 + b"]" * 63 + b"}\n"  # 64 levels with the object
    assert list(parse_upload(UploadHeader("j", "jsonl", "text"), [fine])) == [{"text": "[[[["}]
    assert json_depth_exceeds('"\\"' + "[" * 100 + '"') is False  # brackets inside a string
    assert json_depth_exceeds('{"a": "\\\\", "b": ' + "[" * 65) is True


def test_malformed_csv_is_invalid_argument():
    big_field = b"text\n" + b"a" * 200_000 + b"\n"  # over csv's own field limit
    assert field_of(_upload_error(UploadHeader("c", "csv", "text"), [big_field])) == "chunk"
