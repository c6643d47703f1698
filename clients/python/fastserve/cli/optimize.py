"""`fastserve optimize`: prune, quantize and export a model, then show its before/after report."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from fastserve.cli.common import command, console, group, print_json, state, to_dict
from fastserve.cli.jobs import add_job_commands, exit_code, submitted, watch
from fastserve.optimization.v1 import optimization_pb2 as pb

app = group("Optimize models (jobs): submit with a before/after report, report, watch, list, cancel.")


def _client(ctx: typer.Context):
    return state(ctx).client().optimization


@command(app, "submit", help="Run an optimization job to its end and print its before/after report.")
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
    before, after = report.before, report.after
    table = Table("", "before", "after", "change", title=f"optimization {report.job_id}")
    rows = [("size (MB)", before.size_bytes / 1e6, after.size_bytes / 1e6, "{:,.1f}"),
            ("parameters", before.parameters, after.parameters, "{:,.0f}"),
            ("latency, batch 1 (ms)", before.latency_ms_batch1, after.latency_ms_batch1, "{:,.2f}"),
            (f"throughput, batch {after.batched_size or before.batched_size} (seq/s)", before.throughput_batched,
             after.throughput_batched, "{:,.1f}"),
            (f"quality ({after.quality_metric or before.quality_metric})", before.quality, after.quality, "{:.4f}")]
    if not (after.quality_metric or before.quality_metric):
        rows.pop()  # nothing measured it (no evaluation data)
    for name, b, a, fmt in rows:
        table.add_row(name, fmt.format(b), fmt.format(a), f"×{a / b:.2f}" if b else "")
    table.add_row("backend", before.backend, after.backend, "")
    console.print(table)
    verdict = "within budget" if report.within_budget else "over budget"
    promoted = f"registered as {report.result.uri}" if report.promoted else "not registered"
    console.print(f"relative quality loss {report.relative_degradation:+.2%}: {verdict}, {promoted}", markup=False)


add_job_commands(app, _client)
