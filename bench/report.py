"""The one line every benchmark comparison ends with, so results can be collected by grep."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


def result_line(name: str, fastserve: float, reference: float, unit: str, higher_is_better: bool = True) -> str:
    """`RESULT <name> fastserve=<v> <unit> reference=<v> <unit> ratio=<r>`, the ratio oriented so that
    higher is better for FastServe."""
    ratio = fastserve / reference if higher_is_better else reference / fastserve
    return f"RESULT {name} fastserve={fastserve:.4g} {unit} reference={reference:.4g} {unit} ratio={ratio:.3f}"


def spread(values: Sequence[float], digits: int = 2) -> str:
    """`median m (min a, max b, n=k)` of repeated measurements."""
    return (f"median {statistics.median(values):.{digits}f} (min {min(values):.{digits}f}, "
            f"max {max(values):.{digits}f}, n={len(values)})")


def median_item(items: Sequence[T], key: Callable[[T], float]) -> T:
    """The item whose key is the (lower) median, so its own figures give exactly that median."""
    return sorted(items, key=key)[(len(items) - 1) // 2]
