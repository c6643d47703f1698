"""Importing a Hugging Face model folder through `RegistryService.ImportModel`.

An upload lists every file of the local folder with its size and sha256 in the header, then streams the
files in chunks of 2 MiB, read as they go: no file is held in memory whole. Nothing is skipped: a symlink
or anything but a regular file in the folder is refused here, before the call, so that what the server
publishes is exactly the folder. With `on_server`, the path names a folder the server reads itself, under
its FASTSERVE_IMPORT_ROOTS.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc

from fastserve.client.calls import UPLOAD
from fastserve.client.errors import ClientError
from fastserve.common.v1 import artifacts_pb2
from fastserve.registry.v1 import registry_pb2 as pb
from fastserve.registry.v1 import registry_pb2_grpc

CHUNK = 2 << 20  # within the server's 1-4 MiB, and well under the default 64 MiB message limit
MAX_FILES = 10_000


def import_model(stub: registry_pb2_grpc.RegistryServiceStub, path: str | Path, name: str, *,
                 on_server: bool = False, convert_pickle_weights: bool = False, timeout: float | None = None,
                 request_id: str = "") -> pb.ImportModelResponse:
    """Import the folder `path` as `artifact://models/<name>/<n>`: uploaded, or read by the server from its own
    `path` (`on_server`). `request_id` (default: a new one) makes a retried import return the version the
    first published. Raises `ClientError` for a refused import, and `ValueError` / `FileNotFoundError` for a
    local folder that cannot be uploaded as it is."""
    header = pb.ImportHeader(name=name, convert_pickle_weights=convert_pickle_weights,
                             request_id=request_id or uuid.uuid4().hex)
    if on_server:
        header.server_path = str(path)
        requests: Iterator[pb.ImportModelRequest] = iter([pb.ImportModelRequest(header=header)])
    else:
        folder = Path(path)
        header.source_path = str(folder.resolve())[:1024]
        header.files.extend(local_files(folder))
        requests = _upload(header, folder)
    try:
        return stub.ImportModel(requests, timeout=UPLOAD if timeout is None else timeout)
    except grpc.RpcError as error:
        raise ClientError.from_rpc_error(error) from error


def local_files(folder: Path) -> list[artifacts_pb2.ArtifactFile]:
    """Every file under `folder` with its size and sha256, by '/'-separated relative path; a symlink or a
    special file is refused rather than skipped."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    if folder.is_symlink():
        raise ValueError(f"{folder} is a symlink; name the folder it points to")
    files = []
    for dirpath, dirnames, filenames in os.walk(folder):
        for entry in sorted(dirnames + filenames):
            full = Path(dirpath) / entry
            relative = full.relative_to(folder).as_posix()
            if full.is_symlink():
                raise ValueError(f"{relative} is a symlink: copy the file it points to into the folder")
            if not full.is_dir() and not full.is_file():
                raise ValueError(f"{relative} is not a regular file")
            if full.is_file():
                files.append(artifacts_pb2.ArtifactFile(path=relative, size_bytes=full.stat().st_size,
                                                        sha256=_sha256(full)))
            if len(files) > MAX_FILES:
                raise ValueError(f"{folder} holds over {MAX_FILES} files")
    return sorted(files, key=lambda f: f.path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _upload(header: pb.ImportHeader, folder: Path) -> Iterator[pb.ImportModelRequest]:
    yield pb.ImportModelRequest(header=header)
    for f in header.files:
        with open(folder / f.path, "rb") as source:
            offset = 0
            for block in iter(lambda: source.read(CHUNK), b""):
                yield pb.ImportModelRequest(chunk=pb.FileChunk(path=f.path, offset=offset, data=block))
                offset += len(block)
