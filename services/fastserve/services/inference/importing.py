"""ImportModel: a Hugging Face model folder published as `artifact://models/<name>/<n>`.

The folder comes from the server, under one of FASTSERVE_IMPORT_ROOTS (copied, never moved), or is uploaded
in the call's stream: a header listing every file with its size and sha256, then the files' chunks, each
written straight into the publish draft and checked when its last byte arrives. Before anything is
published the folder is checked (`import_checks`: safetensors weights, a supported architecture without
remote code, the fast tokenizer) and its size held to FASTSERVE_IMPORT_MAX_GB; a failed import leaves
nothing, the draft being removed whole. An import that names a `request_id` already published under its
name returns that version.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import stat
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path

from fastserve.common.v1 import artifacts_pb2
from fastserve.models.kinds import TASKS, model_kind
from fastserve.registry.v1 import registry_pb2 as pb
from fastserve.runtime.config import Config
from fastserve.runtime.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from fastserve.runtime.protos import artifact_ref, struct, timestamp
from fastserve.runtime.stores import Stores
from fastserve.services.inference import import_checks as checks
from fastserve.storage.artifacts import MANIFEST, SCHEME, Artifact, ArtifactStore, check_name, safe_join

MAX_FILES = 10_000
MAX_CHUNK = 4 << 20
MAX_PATH = 1024
RETRY_SCAN = 1000  # versions of a name searched for a retried request id, newest first
_SHA256 = re.compile(r"[0-9a-f]{64}")
_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")  # printable ASCII, as job request ids
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_EMPTY_SHA256 = hashlib.sha256().hexdigest()

# One lock per model name while an import with a request id runs, so that a retry arriving while the
# first is still publishing waits for it and finds it, rather than publishing a second version.
_locks: weakref.WeakValueDictionary[str, threading.Lock] = weakref.WeakValueDictionary()
_locks_guard = threading.Lock()


def import_model(stores: Stores, requests: Iterator[pb.ImportModelRequest]) -> pb.ImportModelResponse:
    """Run one ImportModel stream: its header, then (for an upload) the chunks; the published version."""
    requests = iter(requests)
    header = _header(requests)
    check_name(header.name, "header.name")
    if len(header.source_path) > MAX_PATH or _CONTROL.search(header.source_path):
        raise InvalidArgument(f"source_path must be at most {MAX_PATH} characters without control characters",
                              field="header.source_path")
    if header.request_id and not _REQUEST_ID.fullmatch(header.request_id):
        raise InvalidArgument("request_id must be 1-128 printable ASCII characters without spaces",
                              field="header.request_id")
    lock = _lock(header.name) if header.request_id else threading.Lock()
    with lock:
        found = _published_for(stores.artifacts, header.name, header.request_id) if header.request_id else None
        if found is None:
            if header.server_path:
                found = _import_server(stores, header, requests)
            else:
                found = _import_upload(stores, header, requests)
    return response(found)


def _header(requests: Iterator[pb.ImportModelRequest]) -> pb.ImportHeader:
    first = next(requests, None)
    if first is None or not first.HasField("header"):
        raise InvalidArgument("an ImportModel stream starts with its header", field="header")
    return first.header


def _lock(name: str) -> threading.Lock:
    with _locks_guard:
        lock = _locks.get(name)
        if lock is None:
            lock = _locks[name] = threading.Lock()
        return lock


def _published_for(store: ArtifactStore, name: str, request_id: str) -> Artifact | None:
    for version in reversed(store.versions("models", name)[-RETRY_SCAN:]):
        artifact = store.resolve(f"{SCHEME}models/{name}/{version}")
        if artifact.manifest.get("metadata", {}).get("request_id") == request_id:
            return artifact
    return None


def _metadata(header: pb.ImportHeader, origin: str, path: str, converted: bool, info: checks.ModelInfo) -> dict:
    metadata = {"source": {"type": "import", "from": origin, "path": path, "converted_pickle": converted},
                "architecture": info.architecture, "model_type": info.model_type}
    if header.request_id:
        metadata["request_id"] = header.request_id
    return metadata


def _limit(config: Config) -> int:
    return int(config.import_max_gb * 2**30)


def _too_large(total: int, config: Config, field: str) -> ResourceExhausted:
    return ResourceExhausted(f"the model's files take {total / 2**30:.3g} GiB, over FASTSERVE_IMPORT_MAX_GB="
                             f"{config.import_max_gb:g}", field=field)


# --- from a server folder -----------------------------------------------------------------------------------


def _import_server(stores: Stores, header: pb.ImportHeader, requests: Iterator[pb.ImportModelRequest]) -> Artifact:
    field = "header.server_path"
    if header.files:
        raise InvalidArgument("an import names server_path or lists files to upload, not both", field="header.files")
    if next(requests, None) is not None:
        raise InvalidArgument("an import from server_path is one message, its header", field="chunk")
    with _io_errors(field):
        folder, root = _server_folder(stores.config, header.server_path)
        files = _server_files(folder, root, field)
        total = sum(p.stat().st_size for p in files.values())
        if total > _limit(stores.config):
            raise _too_large(total, stores.config, field)
        layout = checks.check_names(list(files), header.convert_pickle_weights, field)
        info = _check_folder(files, layout, field)
    label = folder.relative_to(root).as_posix()
    metadata = _metadata(header, "server", label, bool(layout.pickle_weights), info)
    with _io_errors(field), stores.artifacts.publish("models", header.name, metadata) as draft:
        for name, source in sorted(files.items()):
            if name not in layout.pickle_weights:
                target = safe_join(draft.path, name, field)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)
        if layout.pickle_weights:
            _convert(files, layout, draft.path, field)
    return stores.artifacts.resolve(draft.ref.uri)


def import_roots(config: Config) -> list[Path]:
    """FASTSERVE_IMPORT_ROOTS, resolved; refused naming the setting when one is not absolute."""
    roots = []
    for raw in re.split(r"[:,]", config.import_roots):
        if raw.strip():
            if not os.path.isabs(raw.strip()):
                raise FailedPrecondition(f"FASTSERVE_IMPORT_ROOTS holds {raw.strip()!r}, which is not an absolute "
                                         "path", field="FASTSERVE_IMPORT_ROOTS")
            roots.append(Path(raw.strip()).resolve())
    return roots


def _server_folder(config: Config, server_path: str) -> tuple[Path, Path]:
    """(the folder, resolved; the import root it lies under)."""
    field = "header.server_path"
    roots = import_roots(config)
    if not roots:
        raise FailedPrecondition("importing from server paths is off on this server: set FASTSERVE_IMPORT_ROOTS "
                                 "to the folders it may read, or upload the files", field=field)
    if len(server_path) > MAX_PATH or _CONTROL.search(server_path):
        raise InvalidArgument(f"server_path must be at most {MAX_PATH} characters without control characters",
                              field=field)
    try:  # symlinks resolved first: a path under a root that leads out of it is outside
        candidates = [(root, (Path(server_path) if os.path.isabs(server_path) else root / server_path).resolve())
                      for root in roots]
    except RuntimeError:
        raise FailedPrecondition(f"{server_path!r} is a symlink loop", field=field) from None
    for root, folder in candidates:
        if folder.is_relative_to(root) and folder.is_dir():
            return folder, root
    inside = [folder.is_relative_to(root) for root, folder in candidates]
    # A relative path resolves outside a root only through '..' or a symlink: an escape, whatever exists.
    if any(inside) if os.path.isabs(server_path) else all(inside):
        raise NotFound(f"{server_path!r} is not a folder on the server", field=field)
    # INVALID_ARGUMENT rather than PERMISSION_DENIED: no credential would let this call read the path (the
    # roots are the server's setting, not a grant), and the caller fixes it by naming a folder inside a root.
    raise InvalidArgument(f"{server_path!r} does not lie inside an import root (FASTSERVE_IMPORT_ROOTS) once its "
                          "symlinks are resolved", field=field)


def _server_files(folder: Path, root: Path, field: str, prefix: str = "") -> dict[str, Path]:
    """The folder's files by relative name, each resolved and kept inside `root`; one level of subfolders
    (the sentence-transformers pooling config), so a symlink loop cannot run on."""
    files: dict[str, Path] = {}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        name = f"{prefix}{entry.name}"
        try:
            target = Path(entry.path).resolve()
        except RuntimeError:  # a symlink loop
            raise FailedPrecondition(f"{name} is a symlink loop", field=field) from None
        if not target.is_relative_to(root):
            raise InvalidArgument(f"{name} is a symlink that leads outside the import root", field=field)
        mode = os.stat(target).st_mode
        if stat.S_ISDIR(mode) and not prefix:
            files.update(_server_files(target, root, field, f"{name}/"))
        elif stat.S_ISREG(mode):
            files[name] = target
        else:
            raise FailedPrecondition(f"{name} is not a regular file", field=field)
        if len(files) > MAX_FILES:
            raise ResourceExhausted(f"the folder holds over {MAX_FILES} files", field=field)
    return files


# --- uploaded -----------------------------------------------------------------------------------------------


def _import_upload(stores: Stores, header: pb.ImportHeader, requests: Iterator[pb.ImportModelRequest]) -> Artifact:
    field = "header.files"
    declared = _declared(header.files)
    total = sum(f.size_bytes for f in declared.values())
    if total > _limit(stores.config):
        raise _too_large(total, stores.config, field)
    layout = checks.check_names(list(declared), header.convert_pickle_weights, field)
    with _io_errors(field), stores.artifacts.publish("models", header.name) as draft:
        files = {name: safe_join(draft.path, name, field) for name in declared}
        _receive(requests, declared, files)
        info = _check_folder(files, layout, field)
        if layout.pickle_weights:
            _convert(files, layout, draft.path, field)
            for name in layout.pickle_weights:
                files.pop(name).unlink()
        draft.metadata = _metadata(header, "upload", header.source_path, bool(layout.pickle_weights), info)
    return stores.artifacts.resolve(draft.ref.uri)


def _declared(listed) -> dict[str, artifacts_pb2.ArtifactFile]:
    if not listed:
        raise InvalidArgument("an upload lists its files (or an import names server_path)", field="header.files")
    if len(listed) > MAX_FILES:
        raise InvalidArgument(f"an upload lists at most {MAX_FILES} files, not {len(listed)}", field="header.files")
    declared: dict[str, artifacts_pb2.ArtifactFile] = {}
    for i, f in enumerate(listed):
        at = f"header.files[{i}]"
        parts = f.path.split("/")
        if not f.path or len(f.path) > MAX_PATH or _CONTROL.search(f.path) or "\\" in f.path or \
                f.path.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise InvalidArgument(f"path {f.path!r} must be a relative path of at most {MAX_PATH} characters, "
                                  "'/'-separated, without '.', '..', empty parts or control characters",
                                  field=f"{at}.path")
        if f.path == MANIFEST or f.path in declared:
            raise InvalidArgument(f"path {f.path!r} is {'reserved' if f.path == MANIFEST else 'listed twice'}",
                                  field=f"{at}.path")
        if f.size_bytes < 0:
            raise InvalidArgument(f"size_bytes of {f.path} is negative", field=f"{at}.size_bytes")
        if not _SHA256.fullmatch(f.sha256):
            raise InvalidArgument(f"sha256 of {f.path} must be 64 lower-case hex digits", field=f"{at}.sha256")
        declared[f.path] = f
    return declared


def _receive(requests: Iterator[pb.ImportModelRequest], declared: dict[str, artifacts_pb2.ArtifactFile],
             files: dict[str, Path]) -> None:
    """Write the chunks into `files`, each file's bytes in order and no more than declared, each file's
    sha256 checked as its last byte arrives; every file complete at the end of the stream."""
    received = dict.fromkeys(declared, 0)
    digests = {name: hashlib.sha256() for name in declared}
    for name, f in declared.items():
        files[name].parent.mkdir(parents=True, exist_ok=True)
        if f.size_bytes == 0:
            files[name].touch()
            _check_digest(name, _EMPTY_SHA256, f.sha256)
    current, out = "", None
    try:
        for message in requests:
            if not message.HasField("chunk"):
                raise InvalidArgument("only the first message of an import is its header", field="header")
            chunk = message.chunk
            if chunk.path not in declared:
                raise InvalidArgument(f"chunk for {chunk.path!r}, which the header does not list", field="chunk.path")
            size, got = declared[chunk.path].size_bytes, received[chunk.path]
            if not chunk.data or len(chunk.data) > MAX_CHUNK:
                raise InvalidArgument(f"a chunk carries 1 byte to {MAX_CHUNK >> 20} MiB, not {len(chunk.data)}",
                                      field="chunk.data")
            if chunk.offset != got:
                raise InvalidArgument(f"chunk of {chunk.path} at offset {chunk.offset}; its next byte is at {got}",
                                      field="chunk.offset")
            if got + len(chunk.data) > size:
                raise InvalidArgument(f"file {chunk.path} gets more than its declared {size} bytes",
                                      field="chunk.data")
            if chunk.path != current:
                if out:
                    out.close()
                current, out = chunk.path, open(files[chunk.path], "ab")
            out.write(chunk.data)
            digests[chunk.path].update(chunk.data)
            received[chunk.path] = got + len(chunk.data)
            if received[chunk.path] == size:
                out.close()
                current, out = "", None
                _check_digest(chunk.path, digests[chunk.path].hexdigest(), declared[chunk.path].sha256)
    finally:
        if out:
            out.close()
    for name, f in declared.items():
        if received[name] != f.size_bytes:
            raise InvalidArgument(f"file {name} got {received[name]} of {f.size_bytes} bytes: the upload ended early",
                                  field="header.files")


def _check_digest(name: str, actual: str, declared: str) -> None:
    if actual != declared:
        raise InvalidArgument(f"file {name} has sha256 {actual}, not the {declared} the header declared",
                              field="header.files")


# --- both ---------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _io_errors(field: str) -> Iterator[None]:
    """A folder the server cannot read, or a store out of space, as a status rather than INTERNAL."""
    try:
        yield
    except OSError as exc:
        # str(exc) names the absolute path; the reason alone tells the caller what is wrong.
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ResourceExhausted(f"the artifact store is out of space: {exc.strerror}", field=field) from None
        raise FailedPrecondition(f"the folder cannot be read: {exc.strerror or type(exc).__name__}",
                                 field=field) from None


def _check_folder(files: dict[str, Path], layout: checks.Layout, field: str) -> checks.ModelInfo:
    """Config first (the cheapest and likeliest to be wrong), then the tokenizer, then the weights."""
    info = checks.check_config(checks.read_json(files[checks.CONFIG], checks.CONFIG, field), field)
    checks.check_tokenizer(files, field)
    checks.check_weights(files, layout, field)
    return info


def _convert(files: dict[str, Path], layout: checks.Layout, target: Path, field: str) -> None:
    written = checks.convert_pickle({n: files[n] for n in layout.pickle_weights}, layout, target, field)
    checks.check_weights({n: target / n for n in written}, checks.Layout((), layout.sharded), field)


def response(artifact: Artifact) -> pb.ImportModelResponse:
    """What an import returns for a published model version."""
    manifest, metadata = artifact.manifest, artifact.manifest.get("metadata", {})
    kind = model_kind(artifact.path)
    return pb.ImportModelResponse(
        artifact=artifacts_pb2.Artifact(
            ref=artifact_ref(artifact.ref.uri), size_bytes=artifact.size_bytes,
            create_time=timestamp(manifest.get("created_at", 0)), metadata=struct(metadata),
            files=[artifacts_pb2.ArtifactFile(path=f["path"], size_bytes=f["size_bytes"], sha256=f["sha256"])
                   for f in manifest.get("files", [])]),
        architecture=metadata.get("architecture", ""), kind=kind, default_task=TASKS[kind])
