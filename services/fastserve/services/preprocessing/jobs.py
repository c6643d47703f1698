"""Preprocessing job handlers, run by Celery workers: each calls the same core the servicer uses."""

from __future__ import annotations

from typing import Any

from fastserve.runtime.job_runner import JobContext, ProgressMeter, job_handler
from fastserve.services.preprocessing.core import Preprocessing


def _meter(ctx: JobContext, core: Preprocessing) -> ProgressMeter:
    return ProgressMeter(ctx, core.source(ctx.params.get("source", {})).file_bytes)


@job_handler("preprocessing.clean")
def clean(ctx: JobContext) -> dict[str, Any]:
    core = Preprocessing(ctx.stores)
    return ctx.publish_once(lambda: core.run_clean(ctx.params, _meter(ctx, core)))


@job_handler("preprocessing.train_tokenizer")
def train_tokenizer(ctx: JobContext) -> dict[str, Any]:
    core = Preprocessing(ctx.stores)
    return ctx.publish_once(lambda: core.run_train_tokenizer(ctx.params, _meter(ctx, core)))


@job_handler("preprocessing.build_dataset")
def build_dataset(ctx: JobContext) -> dict[str, Any]:
    core = Preprocessing(ctx.stores)
    return ctx.publish_once(lambda: core.run_build_dataset(ctx.params, _meter(ctx, core)))
