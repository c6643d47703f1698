"""gRPC servicer of `fastserve.preprocessing.v1.PreprocessingService`: protobuf in, the core, protobuf out."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import grpc

from fastserve.client.protos import enum_name, struct_to_dict
from fastserve.preprocessing.v1 import preprocessing_pb2 as pb
from fastserve.preprocessing.v1 import preprocessing_pb2_grpc
from fastserve.runtime.errors import InvalidArgument
from fastserve.runtime.job_rpcs import JobRpcs
from fastserve.runtime.protos import artifact_ref, job_to_proto
from fastserve.runtime.stores import Stores
from fastserve.services.preprocessing.core import SERVICE, Preprocessing
from fastserve.services.preprocessing.corpus import UploadHeader

DEFAULT_MAX_LENGTH = 512
DEFAULT_SPLITS = {"validation_fraction": 0.05, "test_fraction": 0.0, "seed": 0}


def source_params(source: pb.CorpusSource) -> dict[str, Any]:
    kind = source.WhichOneof("source")
    if kind == "artifact_uri":
        return {"artifact_uri": source.artifact_uri}
    if kind == "builtin":
        b = source.builtin
        return {"builtin": {"name": b.name, "seed": b.seed, "max_documents": b.max_documents,
                            "top_labels": b.top_labels}}
    return {}


def steps_params(steps) -> list[dict[str, Any]]:
    return [{"name": step.name, "options": struct_to_dict(step.options)} for step in steps]


class PreprocessingServicer(JobRpcs, preprocessing_pb2_grpc.PreprocessingServiceServicer):
    service = SERVICE
    pb2 = pb

    def __init__(self, stores: Stores) -> None:
        self.stores = stores
        self.core = Preprocessing(stores)

    def UploadCorpus(self, request_iterator: Iterator[pb.UploadCorpusRequest], context):
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("payload") != "header":
            raise InvalidArgument("the first message of the stream must carry the header", field="header")
        h = first.header
        header = UploadHeader(name=h.name, format=enum_name(pb.TextFormat, h.format, "TEXT_FORMAT_"),
                              text_field=h.text_field or "text", label_field=h.label_field,
                              target_field=h.target_field)

        def chunks() -> Iterator[bytes]:
            for message in request_iterator:
                if message.WhichOneof("payload") != "chunk":
                    raise InvalidArgument("only the first message may carry a header", field="header")
                yield message.chunk

        result = self.core.upload_corpus(header, chunks())
        return pb.UploadCorpusResponse(corpus=artifact_ref(result["corpus_uri"]),
                                       bytes_received=result["bytes_received"], documents=result["documents"])

    def CleanText(self, request: pb.CleanTextRequest, context):
        texts, reports = self.core.clean_text(list(request.texts), steps_params(request.steps))
        return pb.CleanTextResponse(texts=texts, reports=[pb.StepReport(**r.__dict__) for r in reports])

    def SubmitCleanJob(self, request: pb.SubmitCleanJobRequest, context):
        job = self.core.submit_clean({"source": source_params(request.source), "steps": steps_params(request.steps),
                                      "output_name": request.output_name}, request.request_id)
        return pb.SubmitCleanJobResponse(job=job_to_proto(job))

    def TrainTokenizer(self, request: pb.TrainTokenizerRequest, context):
        job = self.core.submit_train_tokenizer({
            "source": source_params(request.source),
            "model": enum_name(pb.TokenizerModel, request.model, "TOKENIZER_MODEL_"),
            "vocab_size": request.vocab_size, "special_tokens": list(request.special_tokens),
            "lowercase": request.lowercase, "min_frequency": request.min_frequency,
            "output_name": request.output_name}, request.request_id)
        return pb.TrainTokenizerResponse(job=job_to_proto(job))

    def Tokenize(self, request: pb.TokenizeRequest, context):
        results = self.core.tokenize(request.tokenizer_uri, list(request.texts), request.add_special_tokens)
        return pb.TokenizeResponse(results=[pb.TokenIds(ids=ids, tokens=tokens) for ids, tokens in results])

    def BuildDataset(self, request: pb.BuildDatasetRequest, context):
        splits = DEFAULT_SPLITS if not request.HasField("splits") else {
            "validation_fraction": request.splits.validation_fraction,
            "test_fraction": request.splits.test_fraction, "seed": request.splits.seed}
        job = self.core.submit_build_dataset({
            "source": source_params(request.source), "tokenizer_uri": request.tokenizer_uri,
            "task": enum_name(pb.DatasetTask, request.task, "DATASET_TASK_"),
            "max_length": request.max_length or DEFAULT_MAX_LENGTH, "max_target_length": request.max_target_length,
            "splits": splits, "text_field": request.text_field, "label_field": request.label_field,
            "target_field": request.target_field, "output_name": request.output_name}, request.request_id)
        return pb.BuildDatasetResponse(job=job_to_proto(job))


def register(server: grpc.Server, stores: Stores) -> Sequence[str]:
    preprocessing_pb2_grpc.add_PreprocessingServiceServicer_to_server(PreprocessingServicer(stores), server)
    return [pb.DESCRIPTOR.services_by_name["PreprocessingService"].full_name]
