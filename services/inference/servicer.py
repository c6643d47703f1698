"""gRPC servicer of `fastserve.inference.v1.InferenceService`: translates protobuf to the core and back."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from fastserve.inference.v1 import inference_pb2, inference_pb2_grpc
from shared.stores import Stores

SERVICE = "inference"


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    """The model repository and online inference; RPCs not yet built answer UNIMPLEMENTED."""

    def __init__(self, stores: Stores) -> None:
        self.stores = stores


def register(server: grpc.Server, stores: Stores) -> Sequence[str]:
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(InferenceServicer(stores), server)
    return [inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name]
