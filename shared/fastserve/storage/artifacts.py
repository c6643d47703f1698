"""The artifact store: datasets, tokenizers, checkpoints and models addressed by URI.

A URI is `artifact://<kind>/<name>/<version>`; version is a positive integer, `latest` or an alias
(`production`: a name pointing at one version). Artifacts live under `<root>/<kind>/<name>/<version>/`
with a `manifest.json` listing every file with its size and sha256. Publishing writes into a staging
folder and renames it into place, so a reader sees a whole artifact or none; a failed or cancelled
writer leaves nothing. A published version is never changed, only deleted. A name's aliases are one
small JSON file beside its versions (`.aliases.json`), replaced by a rename, so that a reader sees the
old aliases or the new ones; writers of a name's aliases (and deletes) take its lock file in turn.
Every path is checked to stay inside the root: `..`, absolute paths and symlinks that lead out are
refused.
"""

from __future__ import annotations

import contextlib
import difflib
import fcntl
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

from fastserve.runtime.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound

SCHEME = "artifact://"
KINDS = ("corpora", "datasets", "tokenizers", "checkpoints", "models", "reports")
MANIFEST = "manifest.json"
STAGING = ".staging"  # drafts and scratch, on the store's filesystem so that publishing is a rename
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # used with fullmatch: `$` would let a final "\n" in
_ALIAS = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")  # fullmatch too; never a number, so never a version
ALIASES = ".aliases.json"  # in a name's folder; `_published` lists only digit folders, so never a version
LOCK = ".lock"  # in a name's folder: held while its aliases change or one of its versions is deleted


@dataclass(frozen=True)
class ArtifactRef:
    """A parsed artifact URI; `version` is None for `latest` or an alias (`alias`) until resolved."""

    kind: str
    name: str
    version: int | None
    alias: str = ""

    @property
    def uri(self) -> str:
        return f"{SCHEME}{self.kind}/{self.name}/{self.version or self.alias or 'latest'}"


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
    if _ALIAS.fullmatch(version):
        return ArtifactRef(kind, name, None, version)
    # str.isdigit alone accepts '²', which int() refuses.
    if not (version.isascii() and version.isdigit()) or int(version) < 1:
        raise InvalidArgument(f"version {version!r} must be a positive integer, 'latest' or an alias (1-64 "
                              "letters, digits, '_' or '-', starting with a letter)", field=field_name)
    return ArtifactRef(kind, name, int(version))


def check_alias(alias: str, field_name: str = "alias") -> None:
    if alias == "latest" or not _ALIAS.fullmatch(alias):
        raise InvalidArgument(f"alias {alias!r} must be 1-64 letters, digits, '_' or '-', starting with a letter, "
                              "and not 'latest'", field=field_name)


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
        self.root, self.owner = Path(root), owner
        self.root.mkdir(parents=True, exist_ok=True)
        self._staging = self.root / STAGING / owner if owner else self.root / STAGING
        self._staging.mkdir(parents=True, exist_ok=True)

    def owned_by(self, owner: str) -> ArtifactStore:
        """The same store, staging under a folder of `owner`'s (a job id), so that what a killed
        writer left half-written can be found and removed by `remove_staging(owner)`; what it publishes
        records `owner` as its `job_id`."""
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
        """The published artifact `uri` names (`latest`: the highest version; an alias: the version it
        points at). NotFound otherwise, naming `field_name` and, for a name nothing is published under, a
        close one of the same kind if any."""
        ref = parse_uri(uri, field_name)
        folder = safe_join(self.root, f"{ref.kind}/{ref.name}", field_name)
        known = _published(folder)
        if not known:
            raise NotFound(f"no artifact {ref.kind}/{ref.name}{self._close_name(ref)}", field=field_name)
        version = ref.version or (self._alias_target(folder, ref, field_name) if ref.alias else known[-1])
        if version not in known:
            shown = ", ".join(map(str, known[-5:]))
            raise NotFound(f"no artifact {ref.kind}/{ref.name}/{version}; its published versions: "
                           f"{'..., ' if len(known) > 5 else ''}{shown}", field=field_name)
        return self.get(ref.kind, ref.name, version, field_name)

    def get(self, kind: str, name: str, version: int, field_name: str = "uri") -> Artifact:
        """One published version, without listing the others (as `resolve` does for a NotFound's hint)."""
        check_kind(kind, field_name)
        check_name(name, field_name)
        path = safe_join(self.root, f"{kind}/{name}/{version}", field_name)
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(f"no artifact {kind}/{name}/{version}", field=field_name) from None
        return Artifact(ArtifactRef(kind, name, version), path, manifest)

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
                    found.append(self.get(k, name_dir.name, version))
        return found

    def delete(self, kind: str, name: str, version: int) -> None:
        """Remove one version: renamed out of sight first, so readers never see half of it. A version an
        alias points at is refused (FailedPrecondition): move or remove the alias first."""
        folder = self._dir(kind, name)
        path = safe_join(self.root, f"{kind}/{name}/{version}")
        if not path.is_dir():
            return
        with self._locked(folder):
            pointing = sorted(a for a, v in _read_aliases(folder).items() if v == version)
            if pointing:
                raise FailedPrecondition(
                    f"alias {', '.join(pointing)} points at {SCHEME}{kind}/{name}/{version}; move or remove it "
                    "first", field="uri")
            doomed = self.scratch("deleted-")
            os.rename(path, doomed / "artifact")
        shutil.rmtree(doomed, ignore_errors=True)

    # -- aliases ---------------------------------------------------------------------------------

    def aliases(self, kind: str, name: str) -> dict[str, int]:
        """The aliases of `kind/name` and the version each points at."""
        return _read_aliases(self._dir(kind, name))

    def set_alias(self, kind: str, name: str, alias: str, version: int | None,
                  field_name: str = "alias_uri") -> int | None:
        """Point `alias` at published `version` (None: remove it) and return the version it pointed at
        before (None: it is new). The file is replaced by a rename: readers see the old or the new."""
        check_alias(alias, field_name)
        folder = self._dir(kind, name)
        if version is not None and (version < 1 or version not in _published(folder)):
            raise NotFound(f"no artifact {kind}/{name}/{version} to point {alias!r} at", field="version")
        if version is None and not folder.is_dir():
            return None
        with self._locked(folder):
            aliases = _read_aliases(folder)
            # Checked again under the lock: a delete of the version may have won the race.
            if version is not None and version not in _published(folder):
                raise NotFound(f"no artifact {kind}/{name}/{version} to point {alias!r} at", field="version")
            previous = aliases.pop(alias, None)
            if version is not None:
                aliases[alias] = version
            if aliases.get(alias) != previous:
                _write_aliases(folder, aliases)
        return previous

    def _alias_target(self, folder: Path, ref: ArtifactRef, field_name: str) -> int:
        aliases = _read_aliases(folder)
        if ref.alias not in aliases:
            known = ", ".join(sorted(aliases)) or "none"
            raise NotFound(f"no alias {ref.alias!r} of {ref.kind}/{ref.name}; its aliases: {known}", field=field_name)
        return aliases[ref.alias]

    @contextlib.contextmanager
    def _locked(self, folder: Path) -> Iterator[None]:
        """The name's lock, across processes (flock is released when its holder dies)."""
        fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

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
            manifest = _write_manifest(staging, kind, name, draft.metadata, self.owner)
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


def _read_aliases(folder: Path) -> dict[str, int]:
    """A name's aliases; a file that is not what `_write_aliases` writes is read as none."""
    try:
        data = json.loads((folder / ALIASES).read_text())
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {a: v for a, v in data.items()
            if isinstance(a, str) and _ALIAS.fullmatch(a) and type(v) is int and v >= 1}


def _write_aliases(folder: Path, aliases: dict[str, int]) -> None:
    fd, temporary = tempfile.mkstemp(prefix=".aliases-", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(dict(sorted(aliases.items())), f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, folder / ALIASES)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def _write_manifest(staging: Path, kind: str, name: str, metadata: dict[str, Any], job_id: str) -> dict[str, Any]:
    files = []
    for path in sorted(p for p in staging.rglob("*") if p.is_file() or p.is_symlink()):
        relative = path.relative_to(staging).as_posix()
        if path.is_symlink():
            raise InvalidArgument(f"artifacts may not hold symlinks ({relative})", field="path")
        if relative == MANIFEST:
            continue
        files.append({"path": relative, "size_bytes": path.stat().st_size, "sha256": sha256_of(path)})
    manifest = {"kind": kind, "name": name, "created_at": time.time(), "files": files, "metadata": metadata}
    if job_id:  # the job that published it: its lineage's first link
        manifest["job_id"] = job_id
    return manifest


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
