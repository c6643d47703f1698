"""Corpora: documents as JSON lines `{"text", "label"?, "target"?}` in a `corpora` artifact.

Uploads in plain text (one document per line), JSONL or CSV are parsed while they stream in, with
strict UTF-8 validation, and written straight into the artifact's staging folder: nothing is held in
memory, and a bad or interrupted upload publishes nothing. The manifest metadata counts documents
and bytes and records the label balance, so later steps can check requests before they queue work.
"""

from __future__ import annotations

import codecs
import collections
import csv
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastserve.runtime.errors import InvalidArgument
from fastserve.storage.artifacts import ArtifactStore

DOCUMENTS = "documents.jsonl"
FORMATS = ("plain", "jsonl", "csv")


@dataclass
class CorpusStats:
    """Counts kept while a corpus is written; becomes the `corpus` entry of its manifest metadata."""

    documents: int = 0
    text_bytes: int = 0
    with_label: int = 0
    with_target: int = 0
    labels: collections.Counter = field(default_factory=collections.Counter)

    def as_metadata(self) -> dict[str, Any]:
        return {"documents": self.documents, "text_bytes": self.text_bytes, "with_label": self.with_label,
                "with_target": self.with_target, "labels": dict(sorted(self.labels.items()))}


class CorpusWriter:
    """Appends documents to `<folder>/documents.jsonl`, counting as it goes."""

    def __init__(self, folder: Path) -> None:
        self.file = open(folder / DOCUMENTS, "w", encoding="utf-8")
        self.stats = CorpusStats()

    def add(self, text: str, label: str | None = None, target: str | None = None) -> None:
        record: dict[str, str] = {"text": text}
        if label is not None:
            record["label"] = label
            self.stats.with_label += 1
            self.stats.labels[label] += 1
        if target is not None:
            record["target"] = target
            self.stats.with_target += 1
        self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.stats.documents += 1
        self.stats.text_bytes += len(text.encode("utf-8"))

    def close(self) -> dict[str, Any]:
        self.file.close()
        return self.stats.as_metadata()


@dataclass
class Corpus:
    """A published corpus: its URI, the documents file and its counts."""

    uri: str
    path: Path
    stats: dict[str, Any]

    @property
    def file_bytes(self) -> int:
        return self.path.stat().st_size

    def documents(self) -> Iterator[dict[str, str]]:
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)

    def batches(self, size: int) -> Iterator[tuple[list[dict[str, str]], int]]:
        """Lists of up to `size` documents, each with the file offset reached (for progress in bytes)."""
        batch: list[dict[str, str]] = []
        with open(self.path, "rb") as f:
            for line in f:
                batch.append(json.loads(line))
                if len(batch) == size:
                    yield batch, f.tell()
                    batch = []
            if batch:
                yield batch, f.tell()


def open_corpus(store: ArtifactStore, uri: str, field_name: str) -> Corpus:
    artifact = store.resolve(uri, field_name)
    if artifact.ref.kind != "corpora":
        raise InvalidArgument(f"{uri} is a {artifact.ref.kind} artifact, not a corpus", field=field_name)
    return Corpus(artifact.ref.uri, artifact.path / DOCUMENTS, artifact.manifest["metadata"]["corpus"])


def publish_corpus(store: ArtifactStore, name: str, documents: Iterable[dict[str, str]],
                   source: dict[str, Any], field_name: str = "output_name", version: int | None = None) -> Corpus:
    """Write `documents` as a new version of corpus `name`; an empty corpus is refused."""
    with store.publish("corpora", name, version=version) as draft:
        writer = CorpusWriter(draft.path)
        try:
            for doc in documents:
                writer.add(doc["text"], doc.get("label"), doc.get("target"))
        finally:
            stats = writer.close()
        if stats["documents"] == 0:
            raise InvalidArgument("the corpus has no documents", field=field_name)
        draft.metadata.update(corpus=stats, source=source)
    return open_corpus(store, draft.ref.uri, field_name)


@dataclass(frozen=True)
class UploadHeader:
    """How to read an upload: its name, format and which fields hold text, label and target."""

    name: str
    format: str
    text_field: str = "text"
    label_field: str = ""
    target_field: str = ""


def decode_utf8(chunks: Iterable[bytes]) -> Iterator[str]:
    """Decode a byte stream strictly; an invalid sequence is refused with its byte offset."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset = 0
    for chunk in chunks:
        try:
            text = decoder.decode(chunk)
        except UnicodeDecodeError as exc:
            where = offset + exc.start
            raise InvalidArgument(f"the upload is not valid UTF-8 at byte {where}", field="chunk") from None
        offset += len(chunk)
        if text:
            yield text
    try:
        tail = decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise InvalidArgument(f"the upload ends inside a UTF-8 sequence (byte {offset})", field="chunk") from None
    if tail:
        yield tail


def lines(texts: Iterable[str]) -> Iterator[str]:
    """Re-cut a stream of text pieces into lines (with their line ends)."""
    pending = ""
    for text in texts:
        pending += text
        *complete, pending = pending.split("\n")
        for line in complete:
            yield line + "\n"
    if pending:
        yield pending


def parse_upload(header: UploadHeader, chunks: Iterable[bytes]) -> Iterator[dict[str, str]]:
    """Documents from an uploaded byte stream, in the header's format."""
    stream = lines(decode_utf8(chunks))
    if header.format == "plain":
        return ({"text": line.strip()} for line in stream if line.strip())
    if header.format == "jsonl":
        return _jsonl(header, stream)
    return _csv(header, stream)


def _record(header: UploadHeader, row: dict[str, Any], where: str) -> dict[str, str]:
    text = row.get(header.text_field)
    if not isinstance(text, str):
        raise InvalidArgument(f"{where} has no text field {header.text_field!r}", field="header.text_field")
    doc = {"text": text}
    for key, name in (("label", header.label_field), ("target", header.target_field)):
        if name:
            if row.get(name) in (None, ""):
                raise InvalidArgument(f"{where} has no {key} field {name!r}", field=f"header.{key}_field")
            doc[key] = str(row[name])
    return doc


def _jsonl(header: UploadHeader, stream: Iterator[str]) -> Iterator[dict[str, str]]:
    for number, line in enumerate(stream, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"line {number} is not JSON: {exc.msg}", field="chunk") from None
        if not isinstance(row, dict):
            raise InvalidArgument(f"line {number} is not a JSON object", field="chunk")
        yield _record(header, row, f"line {number}")


def _csv(header: UploadHeader, stream: Iterator[str]) -> Iterator[dict[str, str]]:
    reader = csv.DictReader(stream)
    columns = reader.fieldnames or []
    for key in ("text_field", "label_field", "target_field"):
        name = getattr(header, key)
        if name and name not in columns:
            raise InvalidArgument(f"the CSV header has no column {name!r} (columns: {', '.join(columns)})",
                                  field=f"header.{key}")
    for number, row in enumerate(reader, 2):
        yield _record(header, row, f"row {number}")


def check_header(header: UploadHeader) -> None:
    if header.format not in FORMATS:
        raise InvalidArgument("format must be TEXT_FORMAT_PLAIN, TEXT_FORMAT_JSONL or TEXT_FORMAT_CSV",
                              field="header.format")
    if header.format != "plain" and not header.text_field:
        raise InvalidArgument("text_field is required for JSONL and CSV", field="header.text_field")
