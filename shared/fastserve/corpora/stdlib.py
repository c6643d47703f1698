"""The built-in corpus: docstrings of the Python standard library on this machine.

Real English text on every machine, with no download. Each docstring (module, class or function) is
one document labelled with its top-level module (`email`, `http`, `asyncio`, `json`, ...), so the same
source serves causal-LM training and topic classification. Sources are parsed with `ast`, never
imported, so building the corpus runs no library code.
"""

from __future__ import annotations

import ast
import collections
import random
import sysconfig
from pathlib import Path

NAME = "stdlib-docstrings"

# Test suites, demos and tooling rather than library documentation.
_SKIP_TOP = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip", "pydoc_data", "site-packages",
             "dist-packages", "venv", "__pycache__", "config-3.11-x86_64-linux-gnu"}


def _top_level(path: Path, root: Path) -> str | None:
    parts = path.relative_to(root).parts
    top = parts[0].removesuffix(".py")
    if top in _SKIP_TOP or top.startswith(("_", ".")) or "test" in parts[1:-1] or "tests" in parts[1:-1]:
        return None
    return top


def _docstrings(source: str) -> list[str]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    nodes = [tree, *(n for n in ast.walk(tree)
                     if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef))]
    return [doc for n in nodes if (doc := ast.get_docstring(n, clean=True))]


def stdlib_documents(seed: int = 0, min_chars: int = 40, max_documents: int = 0,
                     top_labels: int = 0) -> list[dict[str, str]]:
    """Every docstring of at least `min_chars` characters as `{"text", "label"}`, shuffled by `seed`.

    `top_labels` keeps only the documents of the N most frequent modules (0: all); `max_documents`
    then keeps the first N of the shuffled order (0: all). The same arguments give the same list.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    documents = []
    for path in sorted(root.rglob("*.py")):
        label = _top_level(path, root)
        if label is None:
            continue
        try:
            source = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        documents.extend({"text": doc, "label": label} for doc in _docstrings(source) if len(doc) >= min_chars)
    if top_labels:
        keep = {label for label, _ in collections.Counter(d["label"] for d in documents).most_common(top_labels)}
        documents = [d for d in documents if d["label"] in keep]
    random.Random(seed).shuffle(documents)
    return documents[:max_documents] if max_documents else documents
