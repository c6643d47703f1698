"""The one line every benchmark comparison ends with, so results can be collected by grep."""

from __future__ import annotations


def result_line(name: str, fastserve: float, reference: float, unit: str, higher_is_better: bool = True) -> str:
    """`RESULT <name> fastserve=<v> <unit> reference=<v> <unit> ratio=<r>`, the ratio oriented so that
    higher is better for FastServe."""
    ratio = fastserve / reference if higher_is_better else reference / fastserve
    return f"RESULT {name} fastserve={fastserve:.4g} {unit} reference={reference:.4g} {unit} ratio={ratio:.3f}"
