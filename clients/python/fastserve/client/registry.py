"""Client of `fastserve.registry.v1.RegistryService`: list, show, alias, download, delete and import artifacts.

A download is written into a temporary folder beside its target, every file checked against the size
and sha256 the server declares, then renamed into place: the target holds the whole version or nothing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import grpc

from fastserve.client.calls import READ, SUBMIT, UPLOAD, ServiceClient
from fastserve.client.errors import ClientError
from fastserve.client.specs import enum_value
from fastserve.common.v1 import artifacts_pb2, pagination_pb2
from fastserve.registry.v1 import registry_pb2 as pb
from fastserve.registry.v1 import registry_pb2_grpc


class RegistryClient(ServiceClient):
    stub_class = registry_pb2_grpc.RegistryServiceStub

    def list_page(self, kind: str | int = 0, name: str = "", *, page_size: int = 0, page_token: str = "",
                  timeout: float | None = None) -> pb.ListArtifactsResponse:
        """One page of versions (`kind`: `models`, `model`, `ARTIFACT_KIND_MODEL` or its number; 0: all)."""
        request = pb.ListArtifactsRequest(kind=_kind(kind), name=name,
                                          page=pagination_pb2.PageRequest(page_size=page_size, page_token=page_token))
        return self._unary("ListArtifacts", request, timeout, READ, True)

    def list(self, kind: str | int = 0, name: str = "", *,
             timeout: float | None = None) -> Iterator[pb.ArtifactSummary]:
        """Every version, page after page, by kind, name and version."""
        token = ""
        while True:
            page = self.list_page(kind, name, page_size=1000, page_token=token, timeout=timeout)
            yield from page.artifacts
            token = page.page.next_page_token
            if not token:
                return

    def show(self, uri: str, *, timeout: float | None = None) -> pb.GetArtifactResponse:
        """One version: files, metadata, aliases, source and lineage (nearest first)."""
        return self._unary("GetArtifact", pb.GetArtifactRequest(uri=uri), timeout, READ, True)

    def delete(self, uri: str, *, timeout: float | None = None) -> artifacts_pb2.ArtifactRef:
        """Delete one numbered version; FAILED_PRECONDITION names the model, job or alias that holds it."""
        # Not retried: a try that deleted it before its reply was lost would be NOT_FOUND the second time.
        return self._unary("DeleteArtifact", pb.DeleteArtifactRequest(uri=uri), timeout, SUBMIT, False).ref

    def set_alias(self, alias_uri: str, version: int, *, timeout: float | None = None) -> pb.SetAliasResponse:
        """Point `artifact://<kind>/<name>/<alias>` at `version` (0 removes it)."""
        request = pb.SetAliasRequest(alias_uri=alias_uri, version=version)
        return self._unary("SetAlias", request, timeout, READ, True)

    def download(self, uri: str, dest: str | Path, *, timeout: float | None = None) -> Path:
        """Write the version's files into the new folder `dest` (which must not exist); returns it."""
        dest = Path(dest)
        if dest.exists():
            raise FileExistsError(f"{dest} exists; download into a new folder")
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
        try:
            _receive(self._stream("DownloadArtifact", pb.DownloadArtifactRequest(uri=uri), timeout, UPLOAD), staging)
            os.rename(staging, dest)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return dest

    def import_model(self, path: str | Path, name: str, *, on_server: bool = False,
                     convert_pickle_weights: bool = False, timeout: float | None = None,
                     request_id: str = "") -> pb.ImportModelResponse:
        """Import a Hugging Face model folder as `artifact://models/<name>/<n>`: uploaded from `path`, or
        read by the server from `path` under its FASTSERVE_IMPORT_ROOTS (`on_server`)."""
        from fastserve.client.model_import import import_model

        return import_model(self._stub, path, name, on_server=on_server, convert_pickle_weights=convert_pickle_weights,
                            timeout=timeout, request_id=request_id)


def _kind(kind: str | int) -> int:
    if isinstance(kind, str) and kind in _PLURALS:
        kind = _PLURALS[kind]
    return enum_value(artifacts_pb2.ArtifactKind, kind, "kind") if kind else 0


# The URI's words for the kinds, as users type them.
_PLURALS = {"corpora": "corpus", "datasets": "dataset", "tokenizers": "tokenizer", "checkpoints": "checkpoint",
            "models": "model", "reports": "report"}


def _receive(parts: Iterator[pb.DownloadArtifactResponse], folder: Path) -> None:
    """Write a download stream's files under `folder`, each checked once its bytes are in."""
    current: _Incoming | None = None
    try:
        for part in parts:
            if part.WhichOneof("part") == "file":
                if current is not None:
                    current.finish()
                current = _Incoming(folder, part.file)
            elif part.WhichOneof("part") == "chunk":
                if current is None or part.chunk.path != current.header.path:
                    raise _corrupt(f"a chunk of {part.chunk.path!r} came outside its file")
                current.write(part.chunk)
        if current is not None:
            current.finish()
    finally:
        if current is not None:
            current.close()


class _Incoming:
    """One file of a download being written: its declared size and sha256 checked as it arrives."""

    def __init__(self, folder: Path, header: artifacts_pb2.ArtifactFile) -> None:
        self.header, self.digest, self.written = header, hashlib.sha256(), 0
        self.path = folder / _relative(header.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.out = open(self.path, "xb")

    def write(self, chunk: pb.FileChunk) -> None:
        if chunk.offset != self.written or self.written + len(chunk.data) > self.header.size_bytes:
            raise _corrupt(f"{self.header.path}: a chunk at offset {chunk.offset} does not follow the "
                           f"{self.written} bytes received of {self.header.size_bytes}")
        self.out.write(chunk.data)
        self.digest.update(chunk.data)
        self.written += len(chunk.data)

    def finish(self) -> None:
        self.close()
        if self.written != self.header.size_bytes or self.digest.hexdigest() != self.header.sha256:
            raise _corrupt(f"{self.header.path}: received {self.written} bytes of {self.header.size_bytes}, "
                           "or their sha256 differs from the server's")

    def close(self) -> None:
        self.out.close()


def _relative(path: str) -> PurePosixPath:
    """A path the server sent, refused unless it stays inside the download folder."""
    relative = PurePosixPath(path)
    if not path or "\\" in path or relative.is_absolute() or ".." in relative.parts or "\0" in path:
        raise _corrupt(f"the server sent a file path outside the download: {path!r}")
    return relative


def _corrupt(message: str) -> ClientError:
    return ClientError(grpc.StatusCode.DATA_LOSS, message)
