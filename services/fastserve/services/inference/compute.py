"""One thread runs every PyTorch computation of the inference process: loading, batches, engine steps.

Why: torch's CPU kernels parallelise with OpenMP, and OpenMP gives every thread that enters a
parallel region its own team of worker threads. Two such threads (say the main thread that loaded a
model and the worker that runs it) make more OpenMP threads than cores on a small machine; libgomp
then cuts its spin-waits short, and every parallel region pays for waking its workers. Measured on
2 cores: small kernels 1.7 to 5 times slower and the generation engine 25% slower than the same code
with a single team. Funnelling all model work through one thread keeps one team. Calls from many
request threads queue here; on a GPU the kernels are asynchronous, so the queue costs little there.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")
_local = threading.local()


def _mark() -> None:
    _local.on_compute_thread = True


_executor.submit(_mark).result()


def on_compute_thread(fn: Callable[..., T], *args, **kwargs) -> T:
    """Run `fn` on the compute thread and return its result (or raise its exception)."""
    if getattr(_local, "on_compute_thread", False):
        return fn(*args, **kwargs)
    return _executor.submit(fn, *args, **kwargs).result()
