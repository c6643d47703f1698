"""Waiting on a condition in a test instead of sleeping for a guess at how long it takes."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(condition: Callable[[], T], what: str, timeout: float = 10.0, interval: float = 0.01) -> T:
    """Poll `condition` until it returns something true, and return that; after `timeout` seconds fail the
    test, saying what was awaited. A busy machine only makes it slower, never wrong."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)
    return result


def wait_past(deadline: float) -> None:
    """Return once time.monotonic() has passed `deadline`: for a test whose condition is the clock itself."""
    while (left := deadline - time.monotonic()) >= 0:
        time.sleep(left + 0.001)
