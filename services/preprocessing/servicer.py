"""gRPC servicer of `fastserve.preprocessing.v1.PreprocessingService`: translates protobuf to the core and back."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from fastserve.preprocessing.v1 import preprocessing_pb2, preprocessing_pb2_grpc

from shared.job_rpcs import JobRpcs
from shared.stores import Stores

SERVICE = "preprocessing"


class PreprocessingServicer(JobRpcs, preprocessing_pb2_grpc.PreprocessingServiceServicer):
    """Job RPCs come from JobRpcs; RPCs not yet built answer UNIMPLEMENTED (the generated default)."""

    service = SERVICE
    pb2 = preprocessing_pb2

    def __init__(self, stores: Stores) -> None:
        self.stores = stores


def register(server: grpc.Server, stores: Stores) -> Sequence[str]:
    preprocessing_pb2_grpc.add_PreprocessingServiceServicer_to_server(PreprocessingServicer(stores), server)
    return [preprocessing_pb2.DESCRIPTOR.services_by_name["PreprocessingService"].full_name]
