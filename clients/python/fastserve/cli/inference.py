"""Inference from the terminal: `models list | load | unload`, `generate` (streamed), `embed`, `classify`."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from fastserve.cli.common import command, console, group, print_json, state, to_dict
from fastserve.client import sampling_params
from fastserve.client.protos import enum_name
from fastserve.inference.v1 import inference_pb2 as pb

models = group("Models the inference service serves: list, load, unload.")
DEFAULT_MODEL = "all-MiniLM-L6-v2"


def _client(ctx: typer.Context):
    return state(ctx).client().inference


@command(models, "list", help="List the loaded (and loading or failed) models.")
def list_models(ctx: typer.Context, ready: Annotated[bool, typer.Option(help="Only READY models.")] = False) -> int:
    statuses = _client(ctx).list_models(ready_only=ready)
    if state(ctx).json:
        print_json([to_dict(s) for s in statuses])
        return 0
    table = Table("name", "version", "state", "task", "backend", "uri")
    for s in statuses:
        table.add_row(s.name, s.version, enum_name(pb.ModelState, s.state, "MODEL_STATE_"),
                      enum_name(pb.ModelTask, s.config.task, "MODEL_TASK_"),
                      enum_name(pb.Backend, s.config.backend, "BACKEND_"), Text(s.model_uri or s.error))
    console.print(table)
    return 0


@command(models, "load", help="Load a model and wait until it is READY.")
def load(ctx: typer.Context, name: str,
         uri: Annotated[str, typer.Option(help="Model URI; default artifact://models/<name>/latest.")] = "",
         version: Annotated[str, typer.Option(help="Serving version; default the artifact's.")] = "",
         task: Annotated[str, typer.Option(help="embedding, sequence_classification, generation or raw.")] = "",
         backend: Annotated[str, typer.Option(help="pytorch or onnxruntime; default from the artifact.")] = "",
         dtype: Annotated[str, typer.Option(help="float32, float16 or bfloat16.")] = "",
         max_batch_size: Annotated[int, typer.Option(help="Turn on dynamic batching with this batch size.")] = 0,
         scheduling: Annotated[str, typer.Option(help="fcfs or mlfq (generation).")] = "") -> int:
    status = _client(ctx).load_model(name, uri, version=version, task=task, backend=backend, dtype=dtype,
                                     max_batch_size=max_batch_size, scheduling=scheduling)
    if state(ctx).json:
        print_json(to_dict(status))
    else:
        print(f"{status.name} {status.version} {enum_name(pb.ModelState, status.state, 'MODEL_STATE_')} "
              f"({status.model_uri})")
    return 0


@command(models, "unload", help="Unload a model once its in-flight requests are done.")
def unload(ctx: typer.Context, name: str, version: Annotated[str, typer.Option(help="Default: latest.")] = "") -> int:
    _client(ctx).unload_model(name, version)
    print_json({"unloaded": name, "version": version}) if state(ctx).json else print(f"unloaded {name}")
    return 0


Model = Annotated[str, typer.Option(help="Serving name of the model.")]


def register(app: typer.Typer) -> None:
    app.add_typer(models, name="models")

    @command(app, "generate", help="Complete a prompt, streaming the text as it is generated.")
    def generate(ctx: typer.Context, prompt: str, model: Model,
                 max_new_tokens: Annotated[int | None, typer.Option(help="Default: the server's (64).")] = None,
                 temperature: Annotated[float, typer.Option(help="0 for greedy decoding.")] = 0.0,
                 top_k: int = 0, top_p: float = 0.0, repetition_penalty: float = 0.0,
                 seed: Annotated[int | None, typer.Option(help="Makes sampling reproducible.")] = None,
                 stop: Annotated[list[str] | None, typer.Option(help="Stop sequence; repeatable.")] = None) -> int:
        sampling = sampling_params(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop or ())
        client = _client(ctx)
        if state(ctx).json:
            print_json(to_dict(client.generate(model, prompt, sampling)))
            return 0
        for text in client.stream_text(model, prompt, sampling):
            sys.stdout.write(text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0

    @command(app, "embed", help="Embed texts; prints one vector (a JSON array) a line.")
    def embed(ctx: typer.Context, texts: list[str], model: Model = DEFAULT_MODEL,
              truncate: Annotated[bool, typer.Option(help="Cut texts longer than the model's window.")] = False
              ) -> int:
        reply = _client(ctx).embed(model, texts, truncate=truncate)
        vectors = [list(e.values) for e in reply.embeddings]
        if state(ctx).json:
            print_json({"model": model, "dimension": reply.dimension, "embeddings": vectors})
        else:
            sys.stdout.write("".join(json.dumps(v) + "\n" for v in vectors))
        return 0

    @command(app, "classify", help="Classify texts with a classification model.")
    def classify(ctx: typer.Context, texts: list[str], model: Model,
                 top_k: Annotated[int, typer.Option(help="Labels per text; 0 for all.")] = 0) -> int:
        reply = _client(ctx).classify(model, texts, top_k=top_k)
        if state(ctx).json:
            print_json([to_dict(r) for r in reply.results])
            return 0
        table = Table("text", "label", "scores")
        for text, result in zip(texts, reply.results, strict=True):
            table.add_row(Text(text), result.label, ", ".join(f"{s.label} {s.score:.3f}" for s in result.scores))
        console.print(table)
        return 0
