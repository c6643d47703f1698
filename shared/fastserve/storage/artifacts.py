"""The artifact store: datasets, tokenizers, checkpoints and models addressed by URI.

A URI is `artifact://<kind>/<name>/<version>`; version is a positive integer or `latest`. Artifacts
live under `<root>/<kind>/<name>/<version>/` with a `manifest.json` listing every file with its size
and sha256. Publishing writes into a staging folder and renames it into place, so a reader sees a
whole artifact or none; a failed or cancelled writer leaves nothing. Every path is checked to stay
inside the root: `..`, absolute paths and symlinks that lead out are refused.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastserve.runtime.errors import AlreadyExists, InvalidArgument, NotFound

SCHEME = "artifact://"
KINDS = ("corpora", "datasets", "tokenizers", "checkpoints", "models", "reports")
MANIFEST = "manifest.json"
STAGING = ".staging"  # drafts and scratch, on the store's filesystem so that publishing is a rename
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # used with fullmatch: `$` would let a final "\n" in


@dataclass(frozen=True)
class ArtifactRef:
    """A parsed artifact URI; `version` is None for `latest` until resolved."""

    kind: str
    name: str
    version: int | None

    @property
    def uri(self) -> str:
        return f"{SCHEME}{self.kind}/{self.name}/{self.version if self.version else 'latest'}"


@dataclass
class Artifact:
    """A published artifact: where it lies and what its manifest says."""

    ref: ArtifactRef
    path: Path
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def size_bytes(self) -> int:
        return sum(f["size_bytes"] for f in self.manifest.get("files", []))


@dataclass
class Draft:
    """An artifact being written: files go under `path`, `metadata` may be filled while writing;
    `ref` is set once it is published."""

    path: Path
    metadata: dict[str, Any] = field(default_factory=dict)
    ref: ArtifactRef | None = None


def parse_uri(uri: str, field_name: str = "uri") -> ArtifactRef:
    """Parse and validate `uri`; errors name `field_name`, the request field it came from."""
    if not uri.startswith(SCHEME):
        raise InvalidArgument(f"{uri!r} is not an artifact URI ({SCHEME}<kind>/<name>/<version>)", field=field_name)
    parts = uri[len(SCHEME):].split("/")
    if len(parts) != 3:
        raise InvalidArgument(f"{uri!r} must have the form {SCHEME}<kind>/<name>/<version>", field=field_name)
    kind, name, version = parts
    check_kind(kind, field_name)
    check_name(name, field_name)
    if version == "latest":
        return ArtifactRef(kind, name, None)
    if not version.isdigit() or int(version) < 1:
        raise InvalidArgument(f"version {version!r} must be a positive integer or 'latest'", field=field_name)
    return ArtifactRef(kind, name, int(version))


def check_kind(kind: str, field_name: str = "kind") -> None:
    if kind not in KINDS:
        raise InvalidArgument(f"unknown artifact kind {kind!r}; one of {', '.join(KINDS)}", field=field_name)


def check_name(name: str, field_name: str = "name") -> None:
    if not _NAME.fullmatch(name):
        raise InvalidArgument(
            f"name {name!r} must be 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit",
            field=field_name)


def safe_join(root: Path, relative: str, field_name: str = "path") -> Path:
    """`root/relative`, refusing absolute paths, `..` and symlinks that lead outside `root`."""
    if not relative or os.path.isabs(relative) or ".." in Path(relative).parts:
        raise InvalidArgument(f"path {relative!r} must be relative and stay inside its root", field=field_name)
    root = root.resolve()
    target = (root / relative).resolve()
    if not target.is_relative_to(root):
        raise InvalidArgument(f"path {relative!r} leads outside its root", field=field_name)
    return target


class ArtifactStore:
    """Local-filesystem store under `root` (by default `FASTSERVE_HOME/artifacts`)."""

    def __init__(self, root: Path, owner: str = "") -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._staging = self.root / STAGING / owner if owner else self.root / STAGING
        self._staging.mkdir(parents=True, exist_ok=True)

    def owned_by(self, owner: str) -> ArtifactStore:
        """The same store, staging under a folder of `owner`'s (a job id), so that what a killed
        writer left half-written can be found and removed by `remove_staging(owner)`."""
        check_name(owner)
        return ArtifactStore(self.root, owner)

    def remove_staging(self, owner: str) -> None:
        """Remove whatever `owner` staged and did not publish; only its current lease holder calls this."""
        check_name(owner)
        shutil.rmtree(self.root / STAGING / owner, ignore_errors=True)

    def scratch(self, prefix: str) -> Path:
        """A new empty folder beside the staging folders, on the store's filesystem; the caller removes it."""
        return Path(tempfile.mkdtemp(prefix=prefix, dir=self._staging))

    def _dir(self, kind: str, name: str) -> Path:
        check_kind(kind)
        check_name(name)
        return safe_join(self.root, f"{kind}/{name}")

    def versions(self, kind: str, name: str) -> list[int]:
        return _published(self._dir(kind, name))

    def resolve(self, uri: str, field_name: str = "uri") -> Artifact:
        """The published artifact `uri` names (`latest`: the highest version). NotFound otherwise, naming
        `field_name` and, for a name nothing is published under, a close one of the same kind if any."""
        ref = parse_uri(uri, field_name)
        known = _published(safe_join(self.root, f"{ref.kind}/{ref.name}", field_name))
        if not known:
            raise NotFound(f"no artifact {ref.kind}/{ref.name}{self._close_name(ref)}", field=field_name)
        version = ref.version or known[-1]
        if version not in known:
            shown = ", ".join(map(str, known[-5:]))
            raise NotFound(f"no artifact {ref.kind}/{ref.name}/{version}; its published versions: "
                           f"{'..., ' if len(known) > 5 else ''}{shown}", field=field_name)
        path = safe_join(self.root, f"{ref.kind}/{ref.name}/{version}", field_name)
        return Artifact(ArtifactRef(ref.kind, ref.name, version), path, json.loads((path / MANIFEST).read_text()))

    def _close_name(self, ref: ArtifactRef) -> str:
        """`; did you mean '<uri>'?` for the published name of `ref`'s kind closest to its name, or ''."""
        folder = self.root / ref.kind
        names = [p.name for p in folder.iterdir() if _NAME.fullmatch(p.name) and not p.is_symlink() and _published(p)] \
            if folder.is_dir() else []
        close = difflib.get_close_matches(ref.name, names, n=1)
        return f"; did you mean '{SCHEME}{ref.kind}/{close[0]}/latest'?" if close else ""

    def file(self, uri: str, relative: str, field_name: str = "path") -> Path:
        """A file inside a published artifact, confined to it."""
        artifact = self.resolve(uri)
        path = safe_join(artifact.path, relative, field_name)
        if not path.exists():
            raise NotFound(f"{uri} has no file {relative!r}")
        return path

    def list(self, kind: str | None = None) -> list[Artifact]:
        """Every published artifact (of `kind`, if given), newest version last per name."""
        found = []
        for k in [kind] if kind else KINDS:
            check_kind(k)
            folder = self.root / k
            if not folder.is_dir():
                continue
            for name_dir in sorted(folder.iterdir()):
                for version in self.versions(k, name_dir.name):
                    found.append(self.resolve(f"{SCHEME}{k}/{name_dir.name}/{version}"))
        return found

    def delete(self, kind: str, name: str, version: int) -> None:
        """Remove one version: renamed out of sight first, so readers never see half of it."""
        path = safe_join(self.root, f"{kind}/{name}/{version}")
        if path.is_dir():
            doomed = self.scratch("deleted-")
            os.rename(path, doomed / "artifact")
            shutil.rmtree(doomed, ignore_errors=True)

    @contextlib.contextmanager
    def publish(self, kind: str, name: str, metadata: dict[str, Any] | None = None,
                version: int | None = None) -> Iterator[Draft]:
        """Yield a draft whose empty staging folder the caller fills; on a clean exit, publish it as the
        next version (or as `version`, which must be new) and set `draft.ref`. On an exception the
        staging folder is removed and nothing is published.
        """
        folder = self._dir(kind, name)
        staging = self.scratch(f"{kind}-{name}-")
        draft = Draft(staging, dict(metadata or {}))
        try:
            yield draft
            manifest = _write_manifest(staging, kind, name, draft.metadata)
            folder.mkdir(parents=True, exist_ok=True)
            published = self._rename_into(staging, folder, kind, name, version, manifest)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        draft.path, draft.ref = folder / str(published), ArtifactRef(kind, name, published)

    def _rename_into(self, staging: Path, folder: Path, kind: str, name: str, version: int | None,
                     manifest: dict[str, Any]) -> int:
        # rename(2) onto a non-empty folder fails, so two writers racing for one version cannot both win.
        candidate = version or (max(self.versions(kind, name), default=0) + 1)
        while True:
            manifest["version"] = candidate
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
            try:
                os.rename(staging, folder / str(candidate))
                return candidate
            except OSError:
                if version is not None:
                    raise AlreadyExists(f"artifact {kind}/{name}/{version} already exists") from None
                candidate += 1


def _published(folder: Path) -> list[int]:
    """The versions published under a name's folder, oldest first."""
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and (p / MANIFEST).is_file())


def _write_manifest(staging: Path, kind: str, name: str, metadata: dict[str, Any]) -> dict[str, Any]:
    files = []
    for path in sorted(p for p in staging.rglob("*") if p.is_file() or p.is_symlink()):
        relative = path.relative_to(staging).as_posix()
        if path.is_symlink():
            raise InvalidArgument(f"artifacts may not hold symlinks ({relative})", field="path")
        if relative == MANIFEST:
            continue
        files.append({"path": relative, "size_bytes": path.stat().st_size, "sha256": sha256_of(path)})
    return {"kind": kind, "name": name, "created_at": time.time(), "files": files, "metadata": metadata}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
