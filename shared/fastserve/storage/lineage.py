"""Where an artifact came from, read from the manifests the services write: its inputs, theirs, and so on.

The keys are those the publishers record: a dataset's `dataset.corpus_uri` and `dataset.tokenizer_uri`
(preprocessing), a cleaned corpus's `source.cleaned_from`, a tokenizer's `tokenizer.trained_on`, a trained
model's `model.dataset_uri` and `model.pretrained_uri` (training), an optimized model's
`optimization.source_model_uri` and the report its job published (optimization), a report's
`report.source_model_uri`. An import records `source = {"type": "import", ...}`; it has no inputs.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from fastserve.runtime.errors import FastServeError
from fastserve.storage.artifacts import SCHEME, Artifact, ArtifactStore

MAX_DEPTH = 16  # links followed from the artifact shown; a longer chain is cut there
MAX_EDGES = 256  # edges returned in all, whatever the fan-in

# (metadata section, key, relation): where each kind of input is recorded.
INPUTS = (
    ("dataset", "corpus_uri", "corpus"),
    ("dataset", "tokenizer_uri", "tokenizer"),
    ("source", "cleaned_from", "cleaned_from"),
    ("tokenizer", "trained_on", "trained_on"),
    ("model", "dataset_uri", "dataset"),
    ("model", "pretrained_uri", "base_model"),
    ("optimization", "source_model_uri", "source_model"),
    ("report", "source_model_uri", "source_model"),
)


@dataclass(frozen=True)
class Edge:
    """`uri` (made by job `job_id`, if a job made it) used `input_uri` as its `relation`."""

    uri: str
    relation: str
    input_uri: str
    job_id: str = ""


def job_of(manifest: dict[str, Any]) -> str:
    """The job that published the artifact: the manifest's own record, else what older publishers put in
    their metadata (a trained model's `model.job_id`, an optimized one's `optimization.job_id`)."""
    if isinstance(manifest.get("job_id"), str) and manifest["job_id"]:
        return manifest["job_id"]
    metadata = manifest.get("metadata") or {}
    for section in ("model", "optimization"):
        value = metadata.get(section)
        if isinstance(value, dict) and isinstance(value.get("job_id"), str) and value["job_id"]:
            return value["job_id"]
    return ""


def source_of(manifest: dict[str, Any]) -> str:
    """Where the artifact came from, in a few words: `job <id>`, `import`, `upload`, `builtin`, or ''."""
    job = job_of(manifest)
    if job:
        return f"job {job}"
    source = (manifest.get("metadata") or {}).get("source")
    if isinstance(source, dict):
        if isinstance(source.get("type"), str):
            return source["type"]
        for kind in ("upload", "builtin", "cleaned_from"):
            if kind in source:
                return kind
    return ""


def inputs_of(artifact: Artifact) -> list[tuple[str, str]]:
    """(relation, input URI) of what `artifact`'s manifest says it was made from; an optimized model's
    report too, which its job published beside it."""
    metadata = artifact.manifest.get("metadata") or {}
    found = []
    for section, key, relation in INPUTS:
        value = metadata.get(section)
        uri = value.get(key) if isinstance(value, dict) else None
        if isinstance(uri, str) and uri:
            found.append((relation, uri))
    optimization = metadata.get("optimization")
    if isinstance(optimization, dict) and isinstance(optimization.get("job_id"), str) and optimization["job_id"]:
        found.append(("report", f"{SCHEME}reports/optimization-{optimization['job_id']}/1"))
    return found


def lineage(store: ArtifactStore, artifact: Artifact, max_depth: int = MAX_DEPTH,
            max_edges: int = MAX_EDGES) -> list[Edge]:
    """The edges from `artifact` to its inputs and, recursively, theirs, nearest first (breadth first),
    each artifact followed once. An input that is not in the store (deleted, or a built-in model) ends
    its branch; it is still listed."""
    edges: list[Edge] = []
    seen = {artifact.ref.uri}
    queue = deque([(artifact, 0)])
    while queue and len(edges) < max_edges:
        current, depth = queue.popleft()
        job = job_of(current.manifest)
        for relation, input_uri in inputs_of(current):
            if len(edges) >= max_edges:
                break
            edges.append(Edge(current.ref.uri, relation, input_uri, job))
            if depth + 1 >= max_depth or not input_uri.startswith(SCHEME):
                continue
            try:
                found = store.resolve(input_uri)
            except FastServeError:  # deleted since, or a URI no store holds
                continue
            if found.ref.uri not in seen:
                seen.add(found.ref.uri)
                queue.append((found, depth + 1))
    return edges
