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
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastserve.runtime.errors import InvalidArgument
from fastserve.storage.artifacts import ArtifactStore

DOCUMENTS = "documents.jsonl"
FORMATS = ("plain", "jsonl", "csv")
# One line (a plain or JSONL document) or one CSV row, in characters: the parser holds one whole, so a
# newline-free upload is refused at this size instead of filling memory.
MAX_LINE_CHARS = 1024 * 1024
# A whole upload, in bytes: it is written to the artifact store's disk as it streams.
MAX_UPLOAD_BYTES = 8 * 1024**3
# JSON nesting of one JSONL line: json.loads recurses once per level, so a deeper line is refused first.
MAX_JSON_DEPTH = 64


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


def lines(texts: Iterable[str], max_chars: int = MAX_LINE_CHARS) -> Iterator[str]:
    """Re-cut a stream of text pieces into lines (with their line ends); a line over `max_chars` is refused.

    The pieces of an unfinished line are kept in a list and joined once, at its end: appending each piece
    to one string would copy the line again for every chunk."""
    pending: list[str] = []
    size = 0
    number = 1
    for text in texts:
        start = 0
        while (newline := text.find("\n", start)) >= 0:
            if size + newline - start > max_chars:
                _too_long(number, max_chars)
            yield "".join(pending) + text[start:newline + 1]
            pending, size, number, start = [], 0, number + 1, newline + 1
        if start < len(text):
            size += len(text) - start
            if size > max_chars:
                _too_long(number, max_chars)
            pending.append(text[start:])
    if pending:
        yield "".join(pending)


def _too_long(number: int, max_chars: int) -> None:
    raise InvalidArgument(f"line {number} is longer than {max_chars} characters (one document per line)",
                          field="chunk")


def capped(chunks: Iterable[bytes], max_bytes: int = MAX_UPLOAD_BYTES) -> Iterator[bytes]:
    """The chunks, refusing the upload once it passes `max_bytes`."""
    received = 0
    for chunk in chunks:
        received += len(chunk)
        if received > max_bytes:
            raise InvalidArgument(f"the upload is larger than {max_bytes} bytes", field="chunk")
        yield chunk


_JSON_SPECIAL = re.compile(r'[\[\]{}"\\]')


def json_depth_exceeds(line: str, max_depth: int = MAX_JSON_DEPTH) -> bool:
    """Whether a JSON text nests arrays and objects deeper than `max_depth`, by one linear scan that skips
    strings. An invalid text may get either answer: json.loads refuses it afterwards."""
    if line.count("[") + line.count("{") <= max_depth:
        return False
    depth = 0
    in_string = False
    escaped_at = -1
    for match in _JSON_SPECIAL.finditer(line):
        at, char = match.start(), match.group()
        if at == escaped_at:
            continue
        if in_string:
            if char == "\\":
                escaped_at = at + 1
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > max_depth:
                return True
        elif char in "]}":
            depth -= 1
    return False


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
        if json_depth_exceeds(line):
            raise InvalidArgument(f"line {number} nests JSON deeper than {MAX_JSON_DEPTH} levels", field="chunk")
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"line {number} is not JSON: {exc.msg}", field="chunk") from None
        if not isinstance(row, dict):
            raise InvalidArgument(f"line {number} is not a JSON object", field="chunk")
        yield _record(header, row, f"line {number}")


def _csv(header: UploadHeader, stream: Iterator[str]) -> Iterator[dict[str, str]]:
    # A quoted field may hold line breaks, so a row can span lines: the characters read since the last row
    # are counted to bound a row as a line is bounded.
    read = [0]

    def counted() -> Iterator[str]:
        for line in stream:
            read[0] += len(line)
            if read[0] > MAX_LINE_CHARS:
                raise InvalidArgument(f"a CSV row is longer than {MAX_LINE_CHARS} characters", field="chunk")
            yield line

    reader = csv.DictReader(counted())
    try:
        columns = reader.fieldnames or []
        for key in ("text_field", "label_field", "target_field"):
            name = getattr(header, key)
            if name and name not in columns:
                raise InvalidArgument(f"the CSV header has no column {name!r} (columns: {', '.join(columns)})",
                                      field=f"header.{key}")
        for number, row in enumerate(reader, 2):
            read[0] = 0
            yield _record(header, row, f"row {number}")
    except csv.Error as exc:  # a field over csv's size limit, a stray quote
        raise InvalidArgument(f"the CSV is malformed near line {reader.line_num}: {exc}", field="chunk") from None


def check_header(header: UploadHeader) -> None:
    if header.format not in FORMATS:
        raise InvalidArgument("format must be TEXT_FORMAT_PLAIN, TEXT_FORMAT_JSONL or TEXT_FORMAT_CSV",
                              field="header.format")
    if header.format != "plain" and not header.text_field:
        raise InvalidArgument("text_field is required for JSONL and CSV", field="header.text_field")
