"""One thread runs every PyTorch computation of the inference process's serving: batches, engine steps.

Why: torch's CPU kernels parallelise with OpenMP, and OpenMP gives every thread that enters a
parallel region its own team of worker threads. Two such threads (say the main thread that loaded a
model and the worker that runs it) make more OpenMP threads than cores on a small machine; libgomp
then cuts its spin-waits short, and every parallel region pays for waking its workers. Measured on
2 cores: small kernels 1.7 to 5 times slower and the generation engine 25% slower than the same code
with a single team. Funnelling all model work through one thread keeps one team. Calls from many
request threads queue here; on a GPU the kernels are asynchronous, so the queue costs little there.

Loading is the exception: a load (reading weights, converting them) can take seconds to minutes, and
on the compute thread it would stall every other model's inference for that long. So a model loads on
a thread of its own (`on_loader_thread`) that ends with the load: its OpenMP team exists only while
it loads (libgomp frees a thread's team when the thread exits), and inference runs with one team again
afterwards. Only the warm-up batch, which is inference, runs on the compute thread.
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


def on_loader_thread(fn: Callable[..., T], *args, **kwargs) -> T:
    """Run `fn` on a new thread that ends when it returns, and return its result (or raise its exception)."""
    result: list = []

    def run() -> None:
        try:
            result.append((True, fn(*args, **kwargs)))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            result.append((False, exc))

    thread = threading.Thread(target=run, name="model-loader", daemon=True)
    thread.start()
    thread.join()
    ok, value = result[0]
    if not ok:
        raise value
    return value
