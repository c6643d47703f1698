"""`fastserve train`: submit, resume, watch, list and cancel training jobs."""

from __future__ import annotations

from typing import Annotated

import typer

from fastserve.cli.common import Flags, command, group, state
from fastserve.cli.jobs import add_job_commands, submitted
from fastserve.client.specs import fill, invalid, options
from fastserve.training.v1 import training_pb2 as pb

app = group("Train or fine-tune models (jobs): submit, resume, watch, list, cancel.")


def _client(ctx: typer.Context):
    return state(ctx).client().training


TRAIN_SUBMIT_FLAGS: Flags = {
    "model": "--pretrained or --arch", "model.pretrained_uri": "--pretrained", "model.architecture": "--arch",
    "model.architecture.*": "--arch {}=", "task": "--task", "dataset_uri": "--dataset", "tokenizer_uri": "--tokenizer",
    "output_name": "--output", "num_processes": "--processes", "hyperparameters": "--hp",
    "hyperparameters.*": "--hp {}=", "hyperparameters.learning_rate": "--lr",
    "hyperparameters.batch_size": "--batch-size", "hyperparameters.max_steps": "--max-steps",
    "hyperparameters.epochs": "--epochs", "hyperparameters.seed": "--seed"}
"""`fastserve train submit`: where its --arch and --hp options land in SubmitTrainingJobRequest."""


@command(app, "submit", help="Queue a training job and print its id (or follow it with --watch).",
         flags=TRAIN_SUBMIT_FLAGS)
def submit(ctx: typer.Context,
           dataset: Annotated[str, typer.Option(help="Dataset URI (artifact://datasets/...).")],
           output: Annotated[str, typer.Option(help="Name the trained model is registered under.")],
           pretrained: Annotated[str, typer.Option(help="Fine-tune this model (artifact://models/..., builtin://...).")]
           = "",
           arch: Annotated[str, typer.Option(help="Train a new model: family=gpt2,num_layers=2,hidden_size=64,"
                                                  "num_heads=4 (any ArchitectureConfig field).")] = "",
           task: Annotated[str, typer.Option(help="causal_lm, sequence_classification or seq2seq; default: the "
                                                  "task the dataset was built for.")] = "",
           tokenizer: Annotated[str, typer.Option(help="Tokenizer URI the dataset was built with.")] = "",
           lr: Annotated[float, typer.Option(help="Peak learning rate; 0 for the default.")] = 0.0,
           batch_size: Annotated[int, typer.Option(help="Micro-batch size; 0 for 8.")] = 0,
           max_steps: Annotated[int, typer.Option(help="Optimizer steps; 0: by epochs.")] = 0,
           epochs: Annotated[int, typer.Option(help="Passes over the data; 0 for 1.")] = 0,
           seed: int = 0,
           hp: Annotated[str, typer.Option(help="Any other hyperparameters: warmup_steps=10,lr_schedule=cosine,...")]
           = "",
           processes: Annotated[int, typer.Option(help="Data-parallel processes; 0: one per GPU, or 1.")] = 0,
           follow: Annotated[bool, typer.Option("--watch", help="Follow the job with a live progress bar.")] = False
           ) -> int:
    if bool(pretrained) == bool(arch):
        raise invalid("model", "give exactly one of --pretrained and --arch")
    model = pretrained or fill(pb.ArchitectureConfig(), options(arch, "model.architecture"), "model.architecture")
    hyperparameters = {"learning_rate": lr, "batch_size": batch_size, "max_steps": max_steps, "epochs": epochs,
                       "seed": seed, **options(hp, "hyperparameters")}
    client = _client(ctx)
    job = client.submit_training_job(dataset_uri=dataset, output_name=output, model=model, task=task,
                                     tokenizer_uri=tokenizer, hyperparameters=hyperparameters,
                                     num_processes=processes)
    return submitted(ctx, client, job, follow)


@command(app, "resume", help="Queue a new job that goes on from the last checkpoint of a cancelled or failed "
                             "one, and print its id (or follow it with --watch).",
         flags={"job_id": "job_id", "max_steps": "--max-steps"})
def resume(ctx: typer.Context,
           job_id: Annotated[str, typer.Argument(help="The cancelled or failed training job.")],
           max_steps: Annotated[int, typer.Option(help="The new total of optimizer steps, counted from the "
                                                       "start; 0: the old job's.")] = 0,
           follow: Annotated[bool, typer.Option("--watch", help="Follow the job with a live progress bar.")] = False
           ) -> int:
    client = _client(ctx)
    return submitted(ctx, client, client.resume_training_job(job_id, max_steps=max_steps), follow)


add_job_commands(app, _client)
