"""The KServe v2 / Open Inference Protocol servicer (package `inference`), over the same core.

An embedding model takes input `text` (BYTES, shape [N]) and returns `embedding` (FP32, [N, dim]); a
classifier returns `label` (BYTES, [N]) and `scores` (FP32, [N, labels]). A generative model takes
`text_input` (BYTES, [N]) with optional request parameters (max_tokens, temperature, top_k, top_p,
repetition_penalty, presence_penalty, frequency_penalty, seed, stop: one string or a JSON list) and
returns `text_output` (BYTES, [N]); ModelStreamInfer streams its chunks, as Triton's decoupled models
do. Inputs come as raw contents (each BYTES element a 4-byte little-endian length and its bytes) or
typed contents; outputs always go in `raw_output_contents`. RepositoryModelLoad takes parameters `uri`,
`backend` and `task`; without them it loads as LoadModel without a config does (the served settings;
backend and task the folder's).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import replace

import numpy as np

from fastserve.kserve.v2 import grpc_service_pb2 as kpb
from fastserve.kserve.v2 import grpc_service_pb2_grpc
from fastserve.models.refs import BUILTIN_MODELS
from fastserve.runtime.errors import FastServeError, InvalidArgument
from fastserve.runtime.interceptors import each_message
from fastserve.services.inference.core import Inference
from fastserve.services.inference.generator import GenerationRequest
from fastserve.services.inference.repository import LoadedModel, ModelSettings
from fastserve.services.inference.sampling_params import SamplingParams
from fastserve.services.inference.servicer import BACKENDS, TASK_ENUMS, deadline_of

SERVER_NAME = "fastserve"
SERVER_VERSION = "0.1.0"
TEXT_INPUT = "text"
PROMPT_INPUT, COMPLETION_OUTPUT = "text_input", "text_output"


def decode_bytes_tensor(raw: bytes, field: str) -> list[bytes]:
    """Elements of a raw BYTES tensor: each a uint32 little-endian length, then that many bytes."""
    items, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidArgument("truncated BYTES element length", field=field)
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise InvalidArgument("a BYTES element runs past the end of its tensor", field=field)
        items.append(raw[offset:offset + length])
        offset += length
    return items


def encode_bytes_tensor(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def _texts(request: kpb.ModelInferRequest, name: str = TEXT_INPUT) -> list[str]:
    if request.raw_input_contents and len(request.raw_input_contents) != len(request.inputs):
        raise InvalidArgument("raw_input_contents must hold one entry per input", field="raw_input_contents")
    for index, tensor in enumerate(request.inputs):
        if tensor.name != name:
            continue
        field = f"inputs[{index}]"
        if tensor.datatype != "BYTES":
            raise InvalidArgument(f"input {name!r} must be BYTES, got {tensor.datatype or 'nothing'}",
                                  field=f"{field}.datatype")
        items = decode_bytes_tensor(request.raw_input_contents[index], "raw_input_contents") \
            if request.raw_input_contents else list(tensor.contents.bytes_contents)
        shape = list(tensor.shape)
        if not items:
            raise InvalidArgument("the batch is empty", field=f"{field}.shape")
        if shape not in ([len(items)], [len(items), 1]):
            raise InvalidArgument(f"shape {shape} does not match {len(items)} elements; use [N] or [N, 1]",
                                  field=f"{field}.shape")
        try:
            return [item.decode("utf-8") for item in items]
        except UnicodeDecodeError:
            raise InvalidArgument("text elements must be UTF-8", field=field) from None
    raise InvalidArgument(f"the request has no input named {name!r}", field="inputs")


def _param(parameters, key: str, default):
    if key not in parameters:
        return default
    choice = parameters[key]
    kind = choice.WhichOneof("parameter_choice")
    if kind is None:
        raise InvalidArgument(f"parameter {key!r} has no value", field=f"parameters.{key}")
    return getattr(choice, kind)


def _int_param(parameters, key: str, default: int | None) -> int | None:
    """An integer parameter: an int64/int32/uint64 one, or a string of an integer (as some clients send)."""
    return _number_param(parameters, key, default, int, (int,), "an integer")


def _float_param(parameters, key: str, default: float) -> float:
    """A number parameter: a double or integer one, or a string of a number; range checks are
    SamplingParams.validate's, which refuses what parses but is not finite ('nan')."""
    return _number_param(parameters, key, default, float, (int, float), "a number")


def _number_param(parameters, key: str, default, parse, kinds: tuple[type, ...], what: str):
    value = _param(parameters, key, default)
    if value is None or (isinstance(value, kinds) and not isinstance(value, bool)):
        return value if value is None else parse(value)
    if isinstance(value, str):
        try:
            return parse(value.strip())
        except ValueError:
            pass
    raise InvalidArgument(f"parameter {key!r} must be {what}, got {value!r}", field=f"parameters.{key}")


def _bool_param(parameters, key: str) -> bool:
    value = _param(parameters, key, False)
    if isinstance(value, bool):
        return value
    raise InvalidArgument(f"parameter {key!r} must be a bool, got {value!r}", field=f"parameters.{key}")


def _stop_param(parameters) -> tuple[str, ...]:
    """`stop`: one string, or a JSON list of strings."""
    stop = _param(parameters, "stop", "")
    message = "stop must be a string or a JSON list of strings"
    if not isinstance(stop, str):
        raise InvalidArgument(message, field="parameters.stop")
    if not stop.startswith("["):
        return (stop,) if stop else ()
    try:
        stops = json.loads(stop)
    except (ValueError, RecursionError):  # RecursionError: a deeply nested list
        raise InvalidArgument(message, field="parameters.stop") from None
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise InvalidArgument(message, field="parameters.stop")
    return tuple(stops)


# SamplingParams attributes by their KServe parameter names, for the field an error names.
_FIELDS = {"max_new_tokens": "parameters.max_tokens", "stop_sequences": "parameters.stop",
           **{a: f"parameters.{a}" for a in ("temperature", "top_k", "top_p", "repetition_penalty", "seed",
                                             "presence_penalty", "frequency_penalty")}}


def _generation_request(request: kpb.ModelInferRequest, text: str, deadline: float | None) -> GenerationRequest:
    p, defaults = request.parameters, SamplingParams()
    params = SamplingParams(
        max_new_tokens=_int_param(p, "max_tokens", defaults.max_new_tokens),
        temperature=_float_param(p, "temperature", 0.0), top_k=_int_param(p, "top_k", 0),
        top_p=_float_param(p, "top_p", 1.0), repetition_penalty=_float_param(p, "repetition_penalty", 1.0),
        seed=_int_param(p, "seed", None), stop_sequences=_stop_param(p),
        presence_penalty=_float_param(p, "presence_penalty", 0.0),
        frequency_penalty=_float_param(p, "frequency_penalty", 0.0)).validate(_FIELDS)
    return GenerationRequest(text=text, params=params, max_new_tokens_set="max_tokens" in p,
                             priority=_int_param(p, "priority", 0), deadline=deadline)


def _text_response(model: LoadedModel, request_id: str, texts: list[str], final: bool | None = None):
    parameters = {} if final is None else {"triton_final_response": kpb.InferParameter(bool_param=final)}
    return kpb.ModelInferResponse(
        model_name=model.name, model_version=model.version, id=request_id, parameters=parameters,
        outputs=[kpb.ModelInferResponse.InferOutputTensor(name=COMPLETION_OUTPUT, datatype="BYTES",
                                                          shape=[len(texts)])],
        raw_output_contents=[encode_bytes_tensor([t.encode() for t in texts])])


class KServeServicer(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, core: Inference) -> None:
        self.core = core
        self.repository = core.repository

    def ServerLive(self, request, context):
        return kpb.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return kpb.ServerReadyResponse(ready=True)

    def ModelReady(self, request, context):
        try:
            self.repository.get(request.name, request.version)
            return kpb.ModelReadyResponse(ready=True)
        except FastServeError:  # unknown, loading, unloading or failed: not ready
            return kpb.ModelReadyResponse(ready=False)

    def ServerMetadata(self, request, context):
        return kpb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=["model_repository"])

    def ModelMetadata(self, request, context):
        model = self.repository.get(request.name, request.version)
        versions = [m.version for m in self.repository.all() if m.name == model.name]
        meta = kpb.ModelMetadataResponse.TensorMetadata
        if model.task == "generation":
            return kpb.ModelMetadataResponse(name=model.name, versions=versions, platform="pytorch_generation",
                                             inputs=[meta(name=PROMPT_INPUT, datatype="BYTES", shape=[-1])],
                                             outputs=[meta(name=COMPLETION_OUTPUT, datatype="BYTES", shape=[-1])])
        if model.task == "embedding":
            outputs = [meta(name="embedding", datatype="FP32", shape=[-1, model.backend.dimension])]
        elif model.task == "sequence_classification":
            outputs = [meta(name="label", datatype="BYTES", shape=[-1]),
                       meta(name="scores", datatype="FP32", shape=[-1, len(model.backend.labels)])]
        else:
            outputs = [meta(name="last_hidden_state", datatype="FP32", shape=[-1, -1, model.backend.dimension])]
        return kpb.ModelMetadataResponse(name=model.name, versions=versions,
                                         platform=f"{model.backend.platform}_{model.task}",
                                         inputs=[meta(name=TEXT_INPUT, datatype="BYTES", shape=[-1])], outputs=outputs)

    def ModelInfer(self, request: kpb.ModelInferRequest, context):
        if self.repository.get(request.model_name, request.model_version).task == "generation":
            return self._generate(request, context)
        texts = _texts(request)
        truncate = _bool_param(request.parameters, "truncate")
        priority = _int_param(request.parameters, "priority", 0)
        result = self.core.run(request.model_name, request.model_version, texts, truncate, priority,
                               deadline_of(context), bind=lambda future: context.add_callback(future.cancel))
        model, out = result.model, result.outputs
        tensors: list[tuple[str, str, list[int], bytes]] = []
        if model.task == "embedding":
            tensors.append(("embedding", "FP32", list(out.shape), out.astype("<f4").tobytes()))
        elif model.task == "sequence_classification":
            labels = [model.backend.labels[i].encode() for i in out.argmax(axis=1)]
            tensors.append(("label", "BYTES", [len(labels)], encode_bytes_tensor(labels)))
            tensors.append(("scores", "FP32", list(out.shape), out.astype("<f4").tobytes()))
        else:
            width = max(len(h) for h in out)
            padded = np.zeros((len(out), width, out[0].shape[-1]), dtype="<f4")
            for i, h in enumerate(out):
                padded[i, :len(h)] = h
            tensors.append(("last_hidden_state", "FP32", list(padded.shape), padded.tobytes()))
        wanted = {o.name for o in request.outputs}
        unknown = wanted - {t[0] for t in tensors}
        if unknown:
            raise InvalidArgument(f"unknown output(s) {sorted(unknown)}", field="outputs")
        tensors = [t for t in tensors if not wanted or t[0] in wanted]
        return kpb.ModelInferResponse(
            model_name=model.name, model_version=model.version, id=request.id,
            outputs=[kpb.ModelInferResponse.InferOutputTensor(name=n, datatype=d, shape=s) for n, d, s, _ in tensors],
            raw_output_contents=[raw for *_, raw in tensors])

    def _generate(self, request: kpb.ModelInferRequest, context) -> kpb.ModelInferResponse:
        """Every prompt of the request generates at once in the engine; the response keeps their order."""
        deadline = deadline_of(context)
        started = [self.core.start_generation(request.model_name, request.model_version,
                                              _generation_request(request, text, deadline),
                                              lambda seq: context.add_callback(seq.cancel))
                   for text in _texts(request, PROMPT_INPUT)]
        texts = [self.core.complete(model, seqs, deadline)[0][0].text for model, seqs in started]
        return _text_response(started[0][0], request.id, texts)

    def ModelStreamInfer(self, request_iterator, context) -> Iterator[kpb.ModelStreamInferResponse]:
        """Each request of the stream generates in turn; its chunks come back as they are produced, and a
        failed request reports its error in the stream without ending it."""
        for request, refused in each_message(request_iterator):
            try:
                if refused:
                    raise refused
                texts = _texts(request, PROMPT_INPUT)
                if len(texts) != 1:
                    raise InvalidArgument("a streamed request holds one prompt", field="inputs[0].shape")
                model = self.repository.get(request.model_name, request.model_version)
                chunks = self.core.stream(request.model_name, request.model_version,
                                          _generation_request(request, texts[0], deadline_of(context)),
                                          lambda seq: context.add_callback(seq.cancel))
                for chunk in chunks:
                    yield kpb.ModelStreamInferResponse(infer_response=_text_response(
                        model, request.id, [chunk.text], final=chunk.finish is not None))
            except FastServeError as exc:
                yield kpb.ModelStreamInferResponse(error_message=f"{type(exc).__name__}: {exc.message}")

    def RepositoryIndex(self, request, context):
        entries = {}
        if not request.ready:
            for artifact in self.repository.artifacts.list("models"):
                entries[(artifact.ref.name, str(artifact.ref.version))] = ("UNAVAILABLE", "not loaded")
            for name in BUILTIN_MODELS:
                entries[(name, "1")] = ("UNAVAILABLE", "not loaded")
        for model in self.repository.all():
            if not request.ready or model.state.value == "READY":
                entries[(model.name, model.version)] = (model.state.value, model.error)
        return kpb.RepositoryIndexResponse(models=[
            kpb.RepositoryIndexResponse.ModelIndex(name=n, version=v, state=s, reason=r)
            for (n, v), (s, r) in sorted(entries.items())])

    def RepositoryModelLoad(self, request, context):
        uri = str(_param(request.parameters, "uri", ""))
        self.repository.load(request.model_name, uri, settings=self._settings(request.model_name, request.parameters))
        return kpb.RepositoryModelLoadResponse()

    def _settings(self, name: str, parameters) -> ModelSettings | None:
        """What repository parameters `backend` and `task` ask for, over the settings the name is served with;
        None when they ask for nothing (a backend or task left unset is the folder's, as in LoadModel)."""
        backend = str(_param(parameters, "backend", "")).lower()
        task = str(_param(parameters, "task", "")).lower()
        if backend not in BACKENDS.values():
            raise InvalidArgument(f"backend must be pytorch or onnxruntime, not {backend!r}",
                                  field="parameters.backend")
        if task and task not in TASK_ENUMS:
            raise InvalidArgument(f"task must be one of {', '.join(TASK_ENUMS)}, not {task!r}",
                                  field="parameters.task")
        if not backend and not task:
            return None
        served = self.repository.served_settings(name)
        return replace(served, backend=backend or served.backend, task=task or served.task)

    def RepositoryModelUnload(self, request, context):
        self.repository.unload(request.model_name)
        return kpb.RepositoryModelUnloadResponse()

