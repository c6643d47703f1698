"""The artifact registry's core: list, show with lineage, delete what nothing uses, aliases, download.

It runs in the inference process because that process holds the loaded models: a delete checks that no
model serves the version under the repository's lock, the lock a load registers its model under, so
that a version is never deleted while a model is loaded from it. Unfinished jobs are read from the job
store: a job whose params name the version (through any URI that resolves to it) holds it.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastserve.runtime.config import JOB_SERVICES
from fastserve.runtime.errors import FailedPrecondition, FastServeError, InvalidArgument, NotFound
from fastserve.runtime.jobs import Job, JobState
from fastserve.runtime.stores import Stores
from fastserve.services.inference.repository import ModelRepository, State
from fastserve.storage.artifacts import (
    KINDS,
    SCHEME,
    Artifact,
    ArtifactRef,
    check_kind,
    check_name,
    parse_uri,
    safe_join,
)
from fastserve.storage.lineage import Edge, lineage, source_of

DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 50, 1000
CHUNK = 1 << 20  # bytes of a download message
UNFINISHED = frozenset({JobState.QUEUED, JobState.RUNNING, JobState.CANCELLING})
MAX_PARAM_NODES = 10_000  # values of one job's params looked at for URIs
MAX_TOKEN = 1024  # characters of a page token: a kind, a name of at most 128 and a number, encoded


@dataclass
class Shown:
    artifact: Artifact
    aliases: list[str]
    lineage: list[Edge]
    source: str


@dataclass
class Summary:
    artifact: Artifact
    aliases: list[str]
    source: str


@dataclass
class Page:
    items: list[Summary]
    next_page_token: str
    total_size: int


@dataclass(frozen=True)
class FileHeader:
    path: str
    size_bytes: int
    sha256: str


class Registry:
    def __init__(self, stores: Stores, repository: ModelRepository) -> None:
        self.stores, self.repository = stores, repository
        self.artifacts = stores.artifacts

    # -- reading ---------------------------------------------------------------------------------

    def list(self, kind: str = "", name: str = "", page_size: int = 0, page_token: str = "") -> Page:
        """Versions by kind (in `KINDS` order), name and version, one page at a time; the token is the last
        key shown, so a page stays right while versions are published or deleted between pages."""
        if page_size < 0:
            raise InvalidArgument(f"page_size must not be negative, got {page_size}", field="page.page_size")
        if kind:
            check_kind(kind, "kind")
        if name:
            check_name(name, "name")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = _decode_token(page_token)
        keys = self._keys(kind, name)
        rest = [k for k in keys if after is None or _order(k) > _order(after)]
        page = rest[:size]
        aliases: dict[tuple[str, str], dict[int, list[str]]] = {}
        items = []
        for k, n, v in page:
            try:
                artifact = self.artifacts.get(k, n, v)
            except NotFound:  # deleted since the listing
                continue
            if (k, n) not in aliases:
                aliases[(k, n)] = _by_version(self.artifacts.aliases(k, n))
            items.append(Summary(artifact, aliases[(k, n)].get(v, []), source_of(artifact.manifest)))
        more = len(rest) > size
        return Page(items, _encode_token(page[-1]) if more else "", len(keys))

    def _keys(self, kind: str, name: str) -> list[tuple[str, str, int]]:
        keys = []
        for k in [kind] if kind else KINDS:
            folder = self.artifacts.root / k
            if not folder.is_dir():
                continue
            names = [name] if name else sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.is_symlink())
            for n in names:
                try:
                    keys.extend((k, n, v) for v in self.artifacts.versions(k, n))
                except InvalidArgument:  # a folder no publisher made (a name the store refuses)
                    continue
        return sorted(keys, key=_order)

    def show(self, uri: str) -> Shown:
        artifact = self.artifacts.resolve(uri, "uri")
        aliases = _by_version(self.artifacts.aliases(artifact.ref.kind, artifact.ref.name))
        return Shown(artifact, aliases.get(artifact.ref.version, []), lineage(self.artifacts, artifact),
                     source_of(artifact.manifest))

    def download(self, uri: str) -> tuple[Artifact, Iterator[FileHeader | bytes]]:
        """The version `uri` names and its files as a stream: each file's header, then its bytes in chunks
        of at most `CHUNK`; paths are those of its manifest, each confined to the version's folder."""
        artifact = self.artifacts.resolve(uri, "uri")
        return artifact, self._files(artifact)

    def _files(self, artifact: Artifact) -> Iterator[FileHeader | bytes]:
        for entry in artifact.manifest.get("files", []):
            path = safe_join(artifact.path, entry["path"])
            yield FileHeader(entry["path"], entry["size_bytes"], entry["sha256"])
            yield from _chunks(path, artifact.ref.uri, entry["path"])

    # -- changing --------------------------------------------------------------------------------

    def delete(self, uri: str) -> ArtifactRef:
        """Delete one numbered version, refused (FailedPrecondition, naming who) while an unfinished job
        uses it, a loaded model serves it, or an alias points at it."""
        ref = parse_uri(uri, "uri")
        if ref.version is None:
            raise InvalidArgument(f"{uri!r}: a delete names a version number, not 'latest' or an alias",
                                  field="uri")
        artifact = self.artifacts.resolve(uri, "uri")
        self._check_no_job_uses(artifact.ref)
        with self.repository.lock:
            for model in self.repository.all():
                if model.uri == artifact.ref.uri and model.state is not State.FAILED:
                    raise FailedPrecondition(f"model {model.name} version {model.version} serves {artifact.ref.uri} "
                                             f"({model.state.value}); unload it first", field="uri")
            self.artifacts.delete(ref.kind, ref.name, artifact.ref.version)
        return artifact.ref

    def _check_no_job_uses(self, ref: ArtifactRef) -> None:
        resolved: dict[str, str] = {}
        for service in JOB_SERVICES:
            for job in self._unfinished(service):
                for uri in artifact_uris(job.params):
                    if uri not in resolved:
                        try:
                            resolved[uri] = self.artifacts.resolve(uri).ref.uri
                        except FastServeError:  # names nothing (now): it holds nothing
                            resolved[uri] = ""
                    if resolved[uri] == ref.uri:
                        raise FailedPrecondition(f"job {job.job_id} ({service}, {job.state.value}) uses {ref.uri} "
                                                 f"(as {uri}); wait for it to finish or cancel it", field="uri")

    def _unfinished(self, service: str) -> Iterator[Job]:
        token = ""
        while True:
            page = self.stores.jobs.list(service, states=UNFINISHED, page_size=MAX_PAGE_SIZE, page_token=token)
            yield from page.jobs
            token = page.next_page_token
            if not token:
                return

    def set_alias(self, alias_uri: str, version: int) -> tuple[ArtifactRef | None, int]:
        """Point the alias at `version` (0: remove it); the version it points at now (None when removed)
        and the one it pointed at before (0 when new)."""
        ref = parse_uri(alias_uri, "alias_uri")
        if not ref.alias:
            raise InvalidArgument(f"{alias_uri!r} must end in an alias (1-64 letters, digits, '_' or '-', starting "
                                  "with a letter), not a version or 'latest'", field="alias_uri")
        if version < 0:
            raise InvalidArgument(f"version must be a positive version number, or 0 to remove the alias; got {version}",
                                  field="version")
        previous = self.artifacts.set_alias(ref.kind, ref.name, ref.alias, version or None)
        return (ArtifactRef(ref.kind, ref.name, version) if version else None), previous or 0


def artifact_uris(params: Any) -> list[str]:
    """Every string in a job's params that is an artifact URI, however deep (bounded)."""
    found, stack, looked = [], [params], 0
    while stack and looked < MAX_PARAM_NODES:
        value = stack.pop()
        looked += 1
        if isinstance(value, str):
            if value.startswith(SCHEME):
                found.append(value)
        elif isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return found


def _chunks(path: Path, uri: str, relative: str) -> Iterator[bytes]:
    try:
        with open(path, "rb") as f:
            while block := f.read(CHUNK):
                yield block
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise NotFound(f"{uri} was deleted during the download ({relative})", field="uri") from None


def _by_version(aliases: dict[str, int]) -> dict[int, list[str]]:
    result: dict[int, list[str]] = {}
    for alias, version in sorted(aliases.items()):
        result.setdefault(version, []).append(alias)
    return result


def _order(key: tuple[str, str, int]) -> tuple[int, str, int]:
    return KINDS.index(key[0]), key[1], key[2]


def _encode_token(key: tuple[str, str, int]) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(key)).encode()).decode()


def _decode_token(token: str) -> tuple[str, str, int] | None:
    if not token:
        return None
    if len(token) > MAX_TOKEN:
        raise InvalidArgument("page_token is not one this server issued", field="page.page_token")
    try:
        kind, name, version = json.loads(base64.urlsafe_b64decode(token.encode()))
        if kind in KINDS and isinstance(name, str) and type(version) is int:
            check_name(name)
            return kind, name, version
    except (ValueError, TypeError, FastServeError):
        pass
    raise InvalidArgument("page_token is not one this server issued", field="page.page_token")
