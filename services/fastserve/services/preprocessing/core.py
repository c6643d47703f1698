"""The preprocessing core: what the servicer and the job handlers call. It knows nothing of gRPC.

Requests arrive as plain JSON-able dicts (the job parameters, exactly), are checked here before any
work is queued, and are checked again by the job that runs them. Field names in errors are the
request's protobuf field paths.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from fastserve.corpora import stdlib as stdlib_corpus
from fastserve.models.refs import resolve_dir
from fastserve.models.tokenizers import load_tokenizer
from fastserve.runtime import job_queue
from fastserve.runtime.errors import AlreadyExists, InvalidArgument, NotFound
from fastserve.runtime.jobs import Job
from fastserve.runtime.stores import Stores
from fastserve.services.preprocessing.cleaning import CleaningPipeline, StepReport, clean_texts
from fastserve.services.preprocessing.corpus import (
    Corpus,
    UploadHeader,
    capped,
    check_header,
    open_corpus,
    parse_upload,
    publish_corpus,
)
from fastserve.services.preprocessing.dataset_builder import DatasetSpec, build_dataset
from fastserve.services.preprocessing.tokenizer_training import (
    TokenizerSpec,
    cached_tokenizer,
    save_tokenizer,
    train_tokenizer,
)
from fastserve.storage.artifacts import check_name

SERVICE = "preprocessing"
MAX_INLINE_TEXTS = 10_000
BUILTIN_CORPORA = (stdlib_corpus.NAME,)

Progress = Callable[[int, int], None]


def _no_progress(items: int, done_bytes: int) -> None:
    pass


class Preprocessing:
    def __init__(self, stores: Stores) -> None:
        self.stores = stores

    # -- sources -------------------------------------------------------------------------------

    def source(self, source: dict[str, Any], field: str = "source") -> Corpus:
        """The corpus a request names: a published corpus, or a built-in one (built once, then kept)."""
        if "artifact_uri" in source:
            return open_corpus(self.stores.artifacts, source["artifact_uri"], f"{field}.artifact_uri")
        if "builtin" in source:
            return self._builtin(source["builtin"], f"{field}.builtin")
        raise InvalidArgument("a corpus source (artifact_uri or builtin) is required", field=field)

    def _builtin(self, spec: dict[str, Any], field: str) -> Corpus:
        name = spec.get("name") or ""
        if name not in BUILTIN_CORPORA:
            raise InvalidArgument(f"unknown built-in corpus {name!r}; built-ins: {', '.join(BUILTIN_CORPORA)}",
                                  field=f"{field}.name")
        seed, top, limit = int(spec.get("seed", 0)), int(spec.get("top_labels", 0)), int(spec.get("max_documents", 0))
        if top < 0 or limit < 0:
            raise InvalidArgument("top_labels and max_documents must be >= 0", field=field)
        if not 0 <= seed < 2**32:
            raise InvalidArgument("seed must be in [0, 2**32)", field=f"{field}.seed")
        artifact_name = f"builtin-{name}-seed{seed}-top{top}-max{limit}"
        uri = f"artifact://corpora/{artifact_name}/1"
        try:
            return open_corpus(self.stores.artifacts, uri, field)
        except NotFound:
            pass
        documents = stdlib_corpus.stdlib_documents(seed=seed, top_labels=top, max_documents=limit)
        try:
            publish_corpus(self.stores.artifacts, artifact_name, documents, {"builtin": spec}, version=1)
        except AlreadyExists:
            pass  # built meanwhile by another request
        return open_corpus(self.stores.artifacts, uri, field)

    # -- inline RPCs ---------------------------------------------------------------------------

    def upload_corpus(self, header: UploadHeader, chunks: Iterable[bytes]) -> dict[str, Any]:
        """Parse an uploaded stream into a new corpus version; a bad byte anywhere publishes nothing."""
        check_header(header)
        check_name(header.name, "header.name")
        received = [0]

        def counted() -> Iterator[bytes]:
            for chunk in capped(chunks):
                received[0] += len(chunk)
                yield chunk

        corpus = publish_corpus(self.stores.artifacts, header.name, parse_upload(header, counted()),
                                {"upload": {"format": header.format}}, field_name="chunk")
        return {"corpus_uri": corpus.uri, "bytes_received": received[0], "documents": corpus.stats["documents"]}

    def clean_text(self, texts: list[str], steps: list[dict[str, Any]]) -> tuple[list[str], list[StepReport]]:
        _check_inline(texts)
        return clean_texts(texts, steps)

    def tokenize(self, tokenizer_uri: str, texts: list[str],
                 add_special_tokens: bool) -> list[tuple[list[int], list[str]]]:
        _check_inline(texts)
        folder = resolve_dir(self.stores.artifacts, tokenizer_uri, "tokenizer_uri")
        encodings = cached_tokenizer(folder).encode_batch(texts, add_special_tokens=add_special_tokens)
        return [(e.ids, e.tokens) for e in encodings]

    # -- jobs ----------------------------------------------------------------------------------

    def submit_clean(self, params: dict[str, Any], request_id: str = "") -> Job:
        self._check_clean(params)
        return job_queue.submit(self.stores, SERVICE, "preprocessing.clean", params, request_id)

    def submit_train_tokenizer(self, params: dict[str, Any], request_id: str = "") -> Job:
        self._check_tokenizer(params)
        return job_queue.submit(self.stores, SERVICE, "preprocessing.train_tokenizer", params, request_id)

    def submit_build_dataset(self, params: dict[str, Any], request_id: str = "") -> Job:
        self._check_dataset(params)
        return job_queue.submit(self.stores, SERVICE, "preprocessing.build_dataset", params, request_id)

    def _check_clean(self, params: dict[str, Any]) -> tuple[Corpus, CleaningPipeline]:
        check_name(params.get("output_name", ""), "output_name")
        pipeline = CleaningPipeline(params.get("steps", []))
        return self.source(params.get("source", {})), pipeline

    def _check_tokenizer(self, params: dict[str, Any]) -> tuple[Corpus, TokenizerSpec]:
        check_name(params.get("output_name", ""), "output_name")
        spec = tokenizer_spec(params)
        spec.check()
        return self.source(params.get("source", {})), spec

    def _check_dataset(self, params: dict[str, Any]) -> tuple[Corpus, DatasetSpec]:
        check_name(params.get("output_name", ""), "output_name")
        resolve_dir(self.stores.artifacts, params.get("tokenizer_uri", ""), "tokenizer_uri")
        corpus = self.source(params.get("source", {}))
        spec = dataset_spec(params)
        spec.check(corpus.stats)
        return corpus, spec

    def run_clean(self, params: dict[str, Any], progress: Progress = _no_progress) -> dict[str, Any]:
        corpus, pipeline = self._check_clean(params)

        def cleaned() -> Iterator[dict[str, str]]:
            done = 0
            for batch, offset in corpus.batches(1024):
                for doc in batch:
                    text = pipeline.apply(doc["text"])
                    if text is not None:
                        yield {**doc, "text": text}
                done += len(batch)
                progress(done, offset)

        out = publish_corpus(self.stores.artifacts, params["output_name"], cleaned(),
                             {"cleaned_from": corpus.uri, "steps": params.get("steps", [])})
        reports = [r.__dict__ for r in pipeline.reports()]
        return {"corpus_uri": out.uri, "documents_in": corpus.stats["documents"],
                "documents_out": out.stats["documents"], "reports": reports}

    def run_train_tokenizer(self, params: dict[str, Any], progress: Progress = _no_progress) -> dict[str, Any]:
        corpus, spec = self._check_tokenizer(params)

        def texts() -> Iterator[str]:
            done = 0
            for batch, offset in corpus.batches(1024):
                yield from (doc["text"] for doc in batch)
                done += len(batch)
                progress(done, offset)

        tok = train_tokenizer(spec, texts(), length=corpus.stats["documents"])
        with self.stores.artifacts.publish("tokenizers", params["output_name"]) as draft:
            save_tokenizer(tok, spec, draft.path)
            draft.metadata["tokenizer"] = {"model": spec.model, "vocab_size": tok.get_vocab_size(),
                                           "special_tokens": spec.all_special_tokens(), "lowercase": spec.lowercase,
                                           "trained_on": corpus.uri}
        return {"tokenizer_uri": draft.ref.uri, "vocab_size": tok.get_vocab_size()}

    def run_build_dataset(self, params: dict[str, Any], progress: Progress = _no_progress) -> dict[str, Any]:
        corpus, spec = self._check_dataset(params)
        tokenizer_uri = params["tokenizer_uri"]
        tok = load_tokenizer(resolve_dir(self.stores.artifacts, tokenizer_uri, "tokenizer_uri"))
        with self.stores.artifacts.publish("datasets", params["output_name"]) as draft:
            info = build_dataset(corpus, tok, tokenizer_uri, spec, draft.path, progress)
            draft.metadata["dataset"] = {**info, "corpus_uri": corpus.uri}
        splits = {name: split["rows"] for name, split in info["splits"].items()}
        return {"dataset_uri": draft.ref.uri, "rows": splits, "tokens": info["tokens"],
                "documents": info["documents"], "label_map": info["label_map"], "class_balance": info["class_balance"]}


def tokenizer_spec(params: dict[str, Any]) -> TokenizerSpec:
    return TokenizerSpec(model=params.get("model", ""), vocab_size=int(params.get("vocab_size", 0)),
                         special_tokens=tuple(params.get("special_tokens", ())),
                         lowercase=bool(params.get("lowercase", False)),
                         min_frequency=int(params.get("min_frequency") or 2))


def dataset_spec(params: dict[str, Any]) -> DatasetSpec:
    splits = params.get("splits", {})
    return DatasetSpec(
        task=params.get("task", ""), max_length=int(params.get("max_length", 0)),
        max_target_length=int(params.get("max_target_length", 0)),
        validation_fraction=float(splits.get("validation_fraction", 0.0)),
        test_fraction=float(splits.get("test_fraction", 0.0)), seed=int(splits.get("seed", 0)),
        text_field=params.get("text_field") or "text", label_field=params.get("label_field") or "label",
        target_field=params.get("target_field") or "target")


def _check_inline(texts: list[str]) -> None:
    if not texts:
        raise InvalidArgument("texts is empty", field="texts")
    if len(texts) > MAX_INLINE_TEXTS:
        raise InvalidArgument(f"at most {MAX_INLINE_TEXTS} texts inline; submit a job for more", field="texts")

