"""`fastserve optimize`: prune, quantize and export a model, then show its before/after report."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from fastserve.cli.common import Flags, command, console, group, print_json, print_table, state, to_dict
from fastserve.cli.jobs import add_job_commands, exit_code, submitted, watch
from fastserve.client.optimization import QUALITY_HIGHER_IS_BETTER
from fastserve.optimization.v1 import optimization_pb2 as pb

# Which way is better for each figure of a `Measurement`: (higher is better, word for up, word for down).
# The report proto does not say it (only its comments do), so the CLI keeps this small table; the
# quality's direction goes by `quality_metric` (the client's table, which the dashboard reads too). An
# unknown metric gets a direction but no verdict.
FIGURES = {"size_bytes": (False, "larger", "smaller"), "parameters": (False, "more", "fewer"),
           "latency_ms_batch1": (False, "slower", "faster"), "throughput_batched": (True, "higher", "lower")}

app = group("Optimize models (jobs): submit with a before/after report, report, watch, list, cancel.")


def _client(ctx: typer.Context):
    return state(ctx).client().optimization


OPTIMIZE_SUBMIT_FLAGS: Flags = {
    "model_uri": "model", "steps": "--step", "output_name": "--output", "target": "--target",
    "eval_dataset_uri": "--eval-dataset", "max_relative_degradation": "--budget"}
"""`fastserve optimize submit`."""


@command(app, "submit", help="Run an optimization job to its end and print its before/after report.",
         flags=OPTIMIZE_SUBMIT_FLAGS)
def submit(ctx: typer.Context,
           model: Annotated[str, typer.Argument(help="The model to optimize (artifact://models/..., builtin://...).")],
           step: Annotated[list[str], typer.Option(
               help="In order, repeatable: export:onnx[,optimize_graph=true,precision=fp16], "
                    "quantize:int8_dynamic|int8_weight_only|int4_weight_only|onnx_int8_dynamic, "
                    "prune:magnitude_unstructured|structured_heads|structured_channels,sparsity=0.5.")],
           output: Annotated[str, typer.Option(help="Name the optimized model is registered under.")],
           target: Annotated[str, typer.Option(help="cpu or gpu.")] = "cpu",
           eval_dataset: Annotated[str, typer.Option(help="Dataset to measure quality on; default: lineage.")] = "",
           budget: Annotated[float, typer.Option(help="Largest relative quality loss; 0 for 0.02.")] = 0.0,
           force: Annotated[bool, typer.Option(help="Register the result even over the budget.")] = False,
           wait: Annotated[bool, typer.Option(help="Follow the job and print the report.")] = True) -> int:
    client = _client(ctx)
    job = client.submit_optimization_job(model, step, output_name=output, target=target,
                                         eval_dataset_uri=eval_dataset, max_relative_degradation=budget,
                                         force_promote=force)
    if not wait:
        return submitted(ctx, client, job, follow=False)
    # With --json only the report is printed, so that the output is one JSON document.
    code = exit_code(client.wait_job(job.job_id)) if state(ctx).json else watch(ctx, client, job.job_id,
                                                                                   show_result=False)
    if code == 0:
        show_report(ctx, client.get_report(job.job_id))
    return code


@command(app, "report", help="Print the before/after report of a succeeded job.")
def report(ctx: typer.Context, job_id: str) -> int:
    show_report(ctx, _client(ctx).get_report(job_id))
    return 0


def show_report(ctx: typer.Context, report: pb.OptimizationReport) -> None:
    if state(ctx).json:
        print_json(to_dict(report))
        return
    print_table(ctx, report_table(report))
    verdict = "within budget" if report.within_budget else "over budget"
    promoted = f"registered as {report.result.uri}" if report.promoted else "not registered"
    console.print(f"relative quality loss {report.relative_degradation:+.2%}: {verdict}, {promoted}", markup=False)


def report_table(report: pb.OptimizationReport) -> Table:
    """Before, after and the change of each figure: its ratio, which way it went, and whether that is
    better or worse (a worse figure in red, and said in words for a terminal without colour)."""
    before, after = report.before, report.after
    metric = after.quality_metric or before.quality_metric
    table = Table("", "before", "after", "change", title=f"optimization {report.job_id}")
    rows = [("size (MB)", before.size_bytes / 1e6, after.size_bytes / 1e6, "{:,.1f}", FIGURES["size_bytes"]),
            ("parameters", before.parameters, after.parameters, "{:,.0f}", FIGURES["parameters"]),
            ("latency, batch 1 (ms)", before.latency_ms_batch1, after.latency_ms_batch1, "{:,.2f}",
             FIGURES["latency_ms_batch1"]),
            (f"throughput, batch {after.batched_size or before.batched_size} (seq/s)", before.throughput_batched,
             after.throughput_batched, "{:,.1f}", FIGURES["throughput_batched"]),
            (f"quality ({metric})", before.quality, after.quality, "{:.4f}",
             (QUALITY_HIGHER_IS_BETTER.get(metric), "higher", "lower"))]
    if not metric:
        rows.pop()  # nothing measured it (no evaluation data)
    for name, b, a, fmt, direction in rows:
        table.add_row(name, fmt.format(b), fmt.format(a), change(b, a, *direction))
    table.add_row("backend", before.backend, after.backend, "")
    return table


def change(before: float, after: float, higher_is_better: bool | None, up: str, down: str) -> Text:
    """`×1.68 slower, worse` (red), `×3.95 higher, better`, `×1.00 unchanged`; empty without a before."""
    if not before:
        return Text("")
    ratio = after / before
    shown = f"×{ratio:.2f}"
    if shown == "×1.00":
        return Text(f"{shown} unchanged")
    went = up if ratio > 1 else down
    if higher_is_better is None:
        return Text(f"{shown} {went}")
    better = (ratio > 1) == higher_is_better
    return Text(f"{shown} {went}, {'better' if better else 'worse'}", style="green" if better else "bold red")


add_job_commands(app, _client)
