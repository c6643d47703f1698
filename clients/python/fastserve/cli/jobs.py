"""Jobs on the terminal: a live progress bar while a job runs, and the watch, list, get and cancel
commands each job service's group has."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

from fastserve.cli.common import command, console, error_line, print_json, print_table, state, table, to_dict, whole
from fastserve.client import JobClient, state_name
from fastserve.client.protos import struct_to_dict
from fastserve.common.v1 import jobs_pb2

E = jobs_pb2.JobEventType


def metrics_text(data: dict[str, Any]) -> str:
    """`loss 2.3100 · 5,120 tok/s · ETA 0:01:05` from a METRICS event's data (whatever of it is there)."""
    parts = []
    if "loss" in data:
        parts.append(f"loss {data['loss']:.4f}")
    if "eval_loss" in data:
        parts.append(f"eval loss {data['eval_loss']:.4f}")
    if "tokens_per_second" in data:
        parts.append(f"{data['tokens_per_second']:,.0f} tok/s")
    if "eta_seconds" in data:
        seconds = int(data["eta_seconds"])
        parts.append(f"ETA {seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}")
    return " · ".join(parts)


def watch(ctx: typer.Context, client: JobClient, job_id: str, show_result: bool = True) -> int:
    """Follow the job to its end: JSON lines of events with `--json`, else a live bar (then the job's
    result, unless the caller shows it its own way); exit 0 when it succeeded."""
    if state(ctx).json:
        for event in client.watch_job(job_id):
            print(json.dumps(to_dict(event)), flush=True)
        return exit_code(client.get_job(job_id))
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[metrics]}"))
    events = client.watch_job(job_id)
    # The first event before the bar: a job that does not exist is an error line, not an empty bar.
    first = next(events, None)
    with Progress(*columns, console=console) as progress:
        # The state alone: the bar's line must fit a terminal, and the id is in the last line printed.
        task = progress.add_task("QUEUED", total=1.0, metrics="")
        # Metrics accumulate: an evaluation's event carries eval_loss alone, and the bar keeps the loss.
        metrics: dict[str, Any] = {}
        for event in itertools.chain([first] if first else [], events):
            data = struct_to_dict(event.data)
            progress.update(task, completed=event.progress, description=state_name(event.state))
            if event.type == E.JOB_EVENT_TYPE_METRICS:
                metrics.update(data)
                progress.update(task, metrics=metrics_text(metrics))
            elif event.type == E.JOB_EVENT_TYPE_ARTIFACT:
                progress.console.print(f"artifact {data.get('uri', '')} {event.message}".rstrip(), markup=False)
            elif event.type == E.JOB_EVENT_TYPE_LOG and event.message:
                progress.console.print(event.message, markup=False)
    job = client.get_job(job_id)
    if show_result or job.state != jobs_pb2.JOB_STATE_SUCCEEDED:
        show_job(job)
    return exit_code(job)


def exit_code(job: jobs_pb2.Job) -> int:
    return 0 if job.state == jobs_pb2.JOB_STATE_SUCCEEDED else 1


def show_job(job: jobs_pb2.Job) -> None:
    line = f"job {job.job_id} {state_name(job.state)}"
    if job.state == jobs_pb2.JOB_STATE_FAILED:
        error_line(f"{line}: {job.error}")
        return
    console.print(line, markup=False)
    for key, value in whole(struct_to_dict(job.result)).items():
        console.print(f"  {key}: {json.dumps(value) if isinstance(value, dict | list) else value}", markup=False)


def submitted(ctx: typer.Context, client: JobClient, job: jobs_pb2.Job, follow: bool) -> int:
    """After a submit: follow the job, or print it (its id) and return."""
    if follow:
        return watch(ctx, client, job.job_id)
    if state(ctx).json:
        print_json(to_dict(job))
    else:
        print(job.job_id)
    return 0


JOB_FLAGS = {"job_id": "job_id", "filter.states": "--state", "page.page_size": "--limit", "reason": "--reason"}


def add_job_commands(app: typer.Typer, client: Callable[[typer.Context], JobClient]) -> None:
    @command(app, "watch", help="Follow a job to its end (exit 0 when it succeeded).", flags=JOB_FLAGS)
    def watch_command(ctx: typer.Context, job_id: str) -> int:
        return watch(ctx, client(ctx), job_id)

    @command(app, "list", help="List jobs, newest first.", flags=JOB_FLAGS)
    def list_command(ctx: typer.Context,
                     state_filter: Annotated[list[str] | None, typer.Option(
                         "--state", help="Only jobs in this state (queued, running, succeeded, ...); repeatable.")]
                     = None,
                     limit: Annotated[int, typer.Option(help="At most this many jobs.")] = 50) -> int:
        reply = client(ctx).list_jobs(states=state_filter or (), page_size=limit)
        if state(ctx).json:
            print_json({"jobs": [to_dict(j) for j in reply.jobs], "total_size": reply.page.total_size})
            return 0
        jobs = table("job", "type", "state", "progress", "message", "created", long=("message",))
        for job in reply.jobs:
            jobs.add_row(job.job_id, job.job_type.split(".", 1)[-1], state_name(job.state), f"{job.progress:.0%}",
                         Text(job.message), job.create_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S"))
        print_table(ctx, jobs)
        return 0

    @command(app, "get", help="Show one job.", flags=JOB_FLAGS)
    def get_command(ctx: typer.Context, job_id: str) -> int:
        job = client(ctx).get_job(job_id)
        print_json(to_dict(job)) if state(ctx).json else show_job(job)
        return 0

    @command(app, "cancel", help="Ask a job to stop (queued: at once; running: at its next safe point).",
             flags=JOB_FLAGS)
    def cancel_command(ctx: typer.Context, job_id: str,
                       reason: Annotated[str, typer.Option(help="Recorded in the job's log.")] = "") -> int:
        job = client(ctx).cancel_job(job_id, reason)
        print_json(to_dict(job)) if state(ctx).json else print(f"job {job.job_id} {state_name(job.state)}")
        return 0
