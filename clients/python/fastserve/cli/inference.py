"""Inference from the terminal: `models list | load | unload | import`, `generate` (streamed), `embed`, `classify`."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
from rich.text import Text

from fastserve.cli.common import command, group, print_json, print_table, state, table, to_dict
from fastserve.client.inference import sampling_params
from fastserve.client.protos import enum_name
from fastserve.inference.v1 import inference_pb2 as pb

models = group("Models the inference service serves: list, load, unload.")
DEFAULT_MODEL = "all-MiniLM-L6-v2"


def _client(ctx: typer.Context):
    return state(ctx).client().inference


@command(models, "list", help="List the loaded (and loading or failed) models with their serving settings.")
def list_models(ctx: typer.Context, ready: Annotated[bool, typer.Option(help="Only READY models.")] = False) -> int:
    statuses = _client(ctx).list_models(ready_only=ready)
    if state(ctx).json:
        print_json([to_dict(s) for s in statuses])
        return 0
    generating = any(s.config.HasField("generation") for s in statuses)
    headers = ["name", "version", "state", "task", "backend", "scheduling", "batch", "delay", "queue",
               *(["generation"] if generating else []), "uri"]
    rows = table(*headers, long=("generation", "uri"))
    for s in statuses:
        rows.add_row(*serving_row(s, generating))
    print_table(ctx, rows)
    return 0


def serving_row(s: pb.ModelStatus, generating: bool) -> list[str | Text]:
    """A model's row: its state, what it serves, and the settings it is served with (the effective
    ones the server reports: the batch size, how long a request waits for a batch to fill, how many
    may queue; for a generation model the engine's KV slots, context and prefill chunk)."""
    c, b = s.config, s.config.batching
    generation = c.generation if c.HasField("generation") else None
    row: list[str | Text] = [
        s.name, s.version, enum_name(pb.ModelState, s.state, "MODEL_STATE_"),
        enum_name(pb.ModelTask, c.task, "MODEL_TASK_"), enum_name(pb.Backend, c.backend, "BACKEND_"),
        enum_name(pb.SchedulingPolicy, c.scheduling, "SCHEDULING_POLICY_") if c.scheduling else "-",
        str(b.max_batch_size) if b.enabled else "off",
        # The engine of a generation model steps as soon as it can: no batch-fill delay.
        f"{b.max_queue_delay_us / 1000:g} ms" if b.enabled and generation is None else "-",
        str(b.max_queue_size) if b.max_queue_size else "-"]
    if generating:
        row.append(_generation_text(generation, c.scheduling) if generation is not None else "-")
    row.append(Text(s.model_uri or s.error))
    return row


def _generation_text(g: pb.GenerationConfig, scheduling: int) -> str:
    text = f"kv slots {g.kv_slots}, context {g.context}, prefill {g.max_prefill_tokens}"
    if scheduling == pb.SCHEDULING_POLICY_MLFQ:
        text += (f", mlfq levels {g.mlfq_levels}, quantum {g.mlfq_base_quantum}, "
                 f"starvation {g.mlfq_starvation_ms} ms, oldest places {g.mlfq_oldest_places}")
    return text


LOAD_FLAGS = {"name": "name", "model_uri": "--uri", "version": "--version", "config.task": "--task",
              "config.backend": "--backend", "config.dtype": "--dtype", "config.scheduling": "--scheduling",
              "config.batching.max_batch_size": "--max-batch-size"}


@command(models, "load", help="Load a model and wait until it is READY.", flags=LOAD_FLAGS)
def load(ctx: typer.Context, name: str,
         uri: Annotated[str, typer.Option(help="Model URI; default artifact://models/<name>/latest.")] = "",
         version: Annotated[str, typer.Option(help="Serving version; default the artifact's.")] = "",
         task: Annotated[str, typer.Option(help="embedding, sequence_classification, generation or raw; default: "
                                                "the model's own (from its metadata).")] = "",
         backend: Annotated[str, typer.Option(help="pytorch or onnxruntime; default: the model folder's "
                                                   "(onnxruntime for an ONNX export, else pytorch).")] = "",
         dtype: Annotated[str, typer.Option(help="float32, float16 (GPU) or bfloat16; default float32.")] = "",
         max_batch_size: Annotated[int | None, typer.Option(
             help="Largest batch (texts, or sequences a step for generation); default: the server's (32).")]
         = None,
         scheduling: Annotated[str, typer.Option(help="fcfs or mlfq (generation); default fcfs.")] = "") -> int:
    status = _client(ctx).load_model(name, uri, version=version, task=task, backend=backend, dtype=dtype,
                                     max_batch_size=max_batch_size or 0, scheduling=scheduling)
    if state(ctx).json:
        print_json(to_dict(status))
    else:
        print(f"{status.name} {status.version} {enum_name(pb.ModelState, status.state, 'MODEL_STATE_')} "
              f"({status.model_uri})")
    return 0


@command(models, "unload", help="Unload a model once its in-flight requests are done.",
         flags={"name": "name", "version": "--version"})
def unload(ctx: typer.Context, name: str, version: Annotated[str, typer.Option(help="Default: latest.")] = "") -> int:
    _client(ctx).unload_model(name, version)
    print_json({"unloaded": name, "version": version}) if state(ctx).json else print(f"unloaded {name}")
    return 0


IMPORT_FLAGS = {"header.name": "--name", "header.server_path": "path", "header.files": "path",
                "header.convert_pickle_weights": "--convert-pickle-weights", "chunk": "path"}


@command(models, "import", flags=IMPORT_FLAGS,
         help="Import a Hugging Face model folder (safetensors weights, tokenizer.json) as "
              "artifact://models/NAME/<n>: uploaded when PATH is a folder here, else read by the server from "
              "its FASTSERVE_IMPORT_ROOTS.")
def import_folder(ctx: typer.Context, path: str,
                  name: Annotated[str, typer.Option(help="Model name to publish under.")],
                  on_server: Annotated[bool, typer.Option(
                      "--on-server", help="PATH is a folder on the server (under its FASTSERVE_IMPORT_ROOTS), "
                                          "even if one of that name exists here.")] = False,
                  convert_pickle_weights: Annotated[bool, typer.Option(
                      "--convert-pickle-weights", help="Convert pytorch_model.bin weights to safetensors "
                                                       "(loaded with torch.load(weights_only=True)).")] = False) -> int:
    # Imported here: the other model commands need neither the registry stubs nor the upload code.
    from pathlib import Path

    from fastserve.cli.common import LocalError
    from fastserve.client.model_import import import_model
    from fastserve.registry.v1.registry_pb2_grpc import RegistryServiceStub

    upload = not on_server and Path(path).exists()
    stub = RegistryServiceStub(state(ctx).client().channel("inference"))
    try:
        reply = import_model(stub, path, name, on_server=not upload, convert_pickle_weights=convert_pickle_weights)
    except (OSError, ValueError) as exc:
        raise LocalError(f"cannot upload {path}: {exc}") from exc
    if state(ctx).json:
        print_json(to_dict(reply))
        return 0
    print(f"imported {reply.artifact.ref.uri} ({reply.architecture or 'no architecture'}, {reply.kind}, "
          f"{reply.artifact.size_bytes / 2**20:.1f} MiB, {'uploaded' if upload else 'from the server'})")
    print(f"next: fastserve models load {name} --uri artifact://models/{name}/latest")
    return 0


Model = Annotated[str, typer.Option(help="Serving name of the model.")]

GENERATE_FLAGS = {"model": "--model", "text": "prompt", "sampling.max_new_tokens": "--max-new-tokens",
                  "sampling.temperature": "--temperature", "sampling.top_k": "--top-k", "sampling.top_p": "--top-p",
                  "sampling.repetition_penalty": "--repetition-penalty", "sampling.seed": "--seed",
                  "sampling.stop_sequences": "--stop"}
ENCODE_FLAGS = {"model": "--model", "texts": "texts", "truncate": "--truncate", "top_k": "--top-k"}


def register(app: typer.Typer) -> None:
    app.add_typer(models, name="models")

    # Unset options are left to the server, whose defaults the help says (SamplingParams in the proto).
    @command(app, "generate", help="Complete a prompt, streaming the text as it is generated.", flags=GENERATE_FLAGS)
    def generate(ctx: typer.Context, prompt: str, model: Model,
                 max_new_tokens: Annotated[int | None, typer.Option(
                     help="Tokens to generate; default: the server's (64, or what the context window has left).")]
                 = None,
                 temperature: Annotated[float, typer.Option(help="Sampling temperature; 0 for greedy decoding.")]
                 = 0.0,
                 top_k: Annotated[int, typer.Option(help="Sample from the k most likely tokens; 0: no top-k.")] = 0,
                 top_p: Annotated[float | None, typer.Option(
                     help="Nucleus sampling mass, in (0, 1]; default: the server's (1.0, no filtering).")] = None,
                 repetition_penalty: Annotated[float | None, typer.Option(
                     help="Above 1 discourages repeated tokens; default: the server's (1.0, no penalty).")] = None,
                 seed: Annotated[int | None, typer.Option(help="Makes sampling reproducible; default: random.")]
                 = None,
                 stop: Annotated[list[str] | None, typer.Option(help="Stop sequence; repeatable.")] = None) -> int:
        # 0 is what SamplingParams reads as unset (the server's 1.0).
        sampling = sampling_params(max_new_tokens, temperature, top_k, top_p or 0.0, repetition_penalty or 0.0,
                                   seed, stop or ())
        client = _client(ctx)
        if state(ctx).json:
            print_json(to_dict(client.generate(model, prompt, sampling)))
            return 0
        for text in client.stream_text(model, prompt, sampling):
            sys.stdout.write(text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0

    @command(app, "embed", help="Embed texts; prints one vector (a JSON array) a line.", flags=ENCODE_FLAGS)
    def embed(ctx: typer.Context, texts: list[str], model: Model = DEFAULT_MODEL,
              truncate: Annotated[bool, typer.Option(help="Cut texts longer than the model's window (else such a "
                                                          "text is an error).")] = False
              ) -> int:
        reply = _client(ctx).embed(model, texts, truncate=truncate)
        vectors = [list(e.values) for e in reply.embeddings]
        if state(ctx).json:
            print_json({"model": model, "dimension": reply.dimension, "embeddings": vectors})
        else:
            sys.stdout.write("".join(json.dumps(v) + "\n" for v in vectors))
        return 0

    @command(app, "classify", help="Classify texts with a classification model.", flags=ENCODE_FLAGS)
    def classify(ctx: typer.Context, texts: list[str], model: Model,
                 top_k: Annotated[int, typer.Option(help="Labels per text; 0 for all.")] = 0) -> int:
        reply = _client(ctx).classify(model, texts, top_k=top_k)
        if state(ctx).json:
            print_json([to_dict(r) for r in reply.results])
            return 0
        rows = table("text", "label", "scores", long=("text", "scores"))
        for text, result in zip(texts, reply.results, strict=True):
            rows.add_row(Text(text), Text(result.label),
                         Text(", ".join(f"{s.label} {s.score:.3f}" for s in result.scores)))
        print_table(ctx, rows)
        return 0
