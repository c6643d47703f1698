"""Client of `fastserve.preprocessing.v1.PreprocessingService`: corpora, cleaning, tokenizers, datasets.

A corpus source is an `artifact://corpora/...` URI or a built-in corpus name (see
`fastserve.client.specs.corpus_source`); cleaning steps are messages or `name,key=value` strings.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from fastserve.client.calls import COMPUTE, UPLOAD
from fastserve.client.jobs import JobClient
from fastserve.client.specs import clean_step, corpus_source, enum_value
from fastserve.common.v1 import jobs_pb2
from fastserve.preprocessing.v1 import preprocessing_pb2 as pb
from fastserve.preprocessing.v1 import preprocessing_pb2_grpc

Source = str | pb.CorpusSource
Steps = Sequence[str | pb.CleanStep]
CHUNK = 1024 * 1024
# The server's validation fraction when a request sets no splits (BuildDatasetRequest.splits), kept when
# a request sets only the test fraction or the seed: Splits has no unset state for one fraction.
DEFAULT_VALIDATION_FRACTION = 0.05


def _steps(steps: Steps) -> list[pb.CleanStep]:
    return [clean_step(s, f"steps[{i}]") for i, s in enumerate(steps)]


class PreprocessingClient(JobClient):
    stub_class = preprocessing_pb2_grpc.PreprocessingServiceStub
    pb = pb

    def upload_corpus(self, name: str, data: str | Path | bytes | Iterable[bytes], *, format: str | int = "plain",
                      text_field: str = "", label_field: str = "", target_field: str = "",
                      timeout: float | None = None) -> pb.UploadCorpusResponse:
        """Stream a file (a path), bytes, or an iterable of byte chunks as a new corpus version."""
        header = pb.UploadCorpusHeader(name=name, format=enum_value(pb.TextFormat, format, "header.format"),
                                       text_field=text_field, label_field=label_field, target_field=target_field)

        def messages() -> Iterator[pb.UploadCorpusRequest]:
            yield pb.UploadCorpusRequest(header=header)
            for chunk in _chunks(data):
                yield pb.UploadCorpusRequest(chunk=chunk)
        return self._unary("UploadCorpus", messages(), timeout, UPLOAD, False)

    # CleanText and Tokenize change nothing on the server, so they are retried like reads.
    def clean_text(self, texts: Sequence[str], steps: Steps, *,
                   timeout: float | None = None) -> pb.CleanTextResponse:
        request = pb.CleanTextRequest(texts=list(texts), steps=_steps(steps))
        return self._unary("CleanText", request, timeout, COMPUTE, True)

    def tokenize(self, tokenizer_uri: str, texts: Sequence[str], *, add_special_tokens: bool = False,
                 timeout: float | None = None) -> pb.TokenizeResponse:
        request = pb.TokenizeRequest(tokenizer_uri=tokenizer_uri, texts=list(texts),
                                     add_special_tokens=add_special_tokens)
        return self._unary("Tokenize", request, timeout, COMPUTE, True)

    def submit_clean_job(self, source: Source, steps: Steps, output_name: str, *, request_id: str = "",
                         timeout: float | None = None) -> jobs_pb2.Job:
        request = pb.SubmitCleanJobRequest(source=corpus_source(source), steps=_steps(steps), output_name=output_name,
                                           request_id=request_id)
        return self._submit("SubmitCleanJob", request, timeout).job

    def train_tokenizer(self, source: Source, output_name: str, *, model: str | int = "bpe", vocab_size: int = 8000,
                        special_tokens: Sequence[str] = (), lowercase: bool = False, min_frequency: int = 0,
                        request_id: str = "", timeout: float | None = None) -> jobs_pb2.Job:
        request = pb.TrainTokenizerRequest(
            source=corpus_source(source), model=enum_value(pb.TokenizerModel, model, "model"), vocab_size=vocab_size,
            special_tokens=list(special_tokens), lowercase=lowercase, output_name=output_name,
            min_frequency=min_frequency, request_id=request_id)
        return self._submit("TrainTokenizer", request, timeout).job

    def build_dataset(self, source: Source, tokenizer_uri: str, output_name: str, *, task: str | int = "causal_lm",
                      max_length: int = 0, validation_fraction: float | None = None, test_fraction: float = 0.0,
                      seed: int = 0, text_field: str = "", label_field: str = "", target_field: str = "",
                      max_target_length: int = 0, request_id: str = "",
                      timeout: float | None = None) -> jobs_pb2.Job:
        """Queue a dataset build; without `validation_fraction`, `test_fraction` and `seed` the server's
        default splits apply, and without `validation_fraction` alone its validation fraction."""
        request = pb.BuildDatasetRequest(
            source=corpus_source(source), tokenizer_uri=tokenizer_uri, task=enum_value(pb.DatasetTask, task, "task"),
            max_length=max_length, text_field=text_field, label_field=label_field, target_field=target_field,
            output_name=output_name, max_target_length=max_target_length, request_id=request_id)
        if validation_fraction is not None or test_fraction or seed:
            validation = DEFAULT_VALIDATION_FRACTION if validation_fraction is None else validation_fraction
            request.splits.CopyFrom(pb.Splits(validation_fraction=validation, test_fraction=test_fraction, seed=seed))
        return self._submit("BuildDataset", request, timeout).job


def _chunks(data: str | Path | bytes | Iterable[bytes]) -> Iterator[bytes]:
    if isinstance(data, bytes):
        for start in range(0, len(data), CHUNK):
            yield data[start:start + CHUNK]
    elif isinstance(data, str | Path):
        with open(data, "rb") as f:
            while chunk := f.read(CHUNK):
                yield chunk
    else:
        yield from data
