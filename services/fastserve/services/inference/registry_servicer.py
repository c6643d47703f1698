"""gRPC servicer of `fastserve.registry.v1.RegistryService`: protobuf in, the registry core, protobuf out."""

from __future__ import annotations

import grpc

from fastserve.common.v1 import artifacts_pb2, pagination_pb2
from fastserve.registry.v1 import registry_pb2 as pb
from fastserve.registry.v1 import registry_pb2_grpc
from fastserve.runtime.errors import InvalidArgument
from fastserve.runtime.protos import ARTIFACT_KINDS, struct, timestamp
from fastserve.runtime.stores import Stores
from fastserve.services.inference.registry import FileHeader, Registry
from fastserve.services.inference.repository import ModelRepository
from fastserve.storage.artifacts import Artifact, ArtifactRef

KIND_NAMES = {artifacts_pb2.ArtifactKind.Value(f"ARTIFACT_KIND_{word}"): kind for kind, word in ARTIFACT_KINDS.items()}


def ref_proto(ref: ArtifactRef) -> artifacts_pb2.ArtifactRef:
    return artifacts_pb2.ArtifactRef(uri=ref.uri, kind=artifacts_pb2.ArtifactKind.Value(
        f"ARTIFACT_KIND_{ARTIFACT_KINDS[ref.kind]}"), name=ref.name, version=ref.version or 0)


def artifact_proto(artifact: Artifact, files: bool = True) -> artifacts_pb2.Artifact:
    manifest = artifact.manifest
    return artifacts_pb2.Artifact(
        ref=ref_proto(artifact.ref), size_bytes=artifact.size_bytes,
        create_time=timestamp(manifest.get("created_at", 0)),
        metadata=struct(manifest.get("metadata") or {}),
        files=[artifacts_pb2.ArtifactFile(path=f["path"], size_bytes=f["size_bytes"], sha256=f["sha256"])
               for f in manifest.get("files", [])] if files else [])


class RegistryServicer(registry_pb2_grpc.RegistryServiceServicer):
    """Import, list, show, alias, download and delete artifacts."""

    def __init__(self, stores: Stores, repository: ModelRepository) -> None:
        self.stores = stores
        self.core = Registry(stores, repository)

    def ImportModel(self, request_iterator, context):
        # Imported here: the import module comes with its own dependencies, which the other RPCs need not.
        from fastserve.services.inference import importing

        return importing.import_model(self.stores, request_iterator)

    def ListArtifacts(self, request: pb.ListArtifactsRequest, context):
        if request.kind and request.kind not in KIND_NAMES:  # proto3 enums are open
            raise InvalidArgument(f"unknown artifact kind {request.kind}", field="kind")
        page = self.core.list(KIND_NAMES.get(request.kind, ""), request.name, request.page.page_size,
                              request.page.page_token)
        summaries = [pb.ArtifactSummary(ref=ref_proto(s.artifact.ref), size_bytes=s.artifact.size_bytes,
                                        create_time=timestamp(s.artifact.manifest.get("created_at", 0)),
                                        source=s.source, aliases=s.aliases) for s in page.items]
        return pb.ListArtifactsResponse(artifacts=summaries, page=pagination_pb2.PageResponse(
            next_page_token=page.next_page_token, total_size=page.total_size))

    def GetArtifact(self, request: pb.GetArtifactRequest, context):
        shown = self.core.show(request.uri)
        return pb.GetArtifactResponse(
            artifact=artifact_proto(shown.artifact), aliases=shown.aliases, source=shown.source,
            metadata=struct(shown.artifact.manifest.get("metadata") or {}),
            lineage=[pb.LineageEdge(uri=e.uri, relation=e.relation, input_uri=e.input_uri, job_id=e.job_id)
                     for e in shown.lineage])

    def DeleteArtifact(self, request: pb.DeleteArtifactRequest, context):
        return pb.DeleteArtifactResponse(ref=ref_proto(self.core.delete(request.uri)))

    def SetAlias(self, request: pb.SetAliasRequest, context):
        ref, previous = self.core.set_alias(request.alias_uri, request.version)
        return pb.SetAliasResponse(ref=ref_proto(ref) if ref else None, previous_version=previous)

    def DownloadArtifact(self, request: pb.DownloadArtifactRequest, context):
        _, parts = self.core.download(request.uri)
        current, offset = "", 0
        for part in parts:
            if isinstance(part, FileHeader):
                current, offset = part.path, 0
                yield pb.DownloadArtifactResponse(file=artifacts_pb2.ArtifactFile(
                    path=part.path, size_bytes=part.size_bytes, sha256=part.sha256))
            else:
                yield pb.DownloadArtifactResponse(chunk=pb.FileChunk(path=current, offset=offset, data=part))
                offset += len(part)


def add(server: grpc.Server, stores: Stores, repository: ModelRepository) -> str:
    """Serve the registry on `server`; its full service name, for health and reflection."""
    registry_pb2_grpc.add_RegistryServiceServicer_to_server(RegistryServicer(stores, repository), server)
    return pb.DESCRIPTOR.services_by_name["RegistryService"].full_name
