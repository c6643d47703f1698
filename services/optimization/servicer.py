"""gRPC servicer of `fastserve.optimization.v1.OptimizationService`: translates protobuf to the core and back."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from fastserve.optimization.v1 import optimization_pb2, optimization_pb2_grpc
from shared.job_rpcs import JobRpcs
from shared.stores import Stores

SERVICE = "optimization"


class OptimizationServicer(JobRpcs, optimization_pb2_grpc.OptimizationServiceServicer):
    """Job RPCs come from JobRpcs; RPCs not yet built answer UNIMPLEMENTED (the generated default)."""

    service = SERVICE
    pb2 = optimization_pb2

    def __init__(self, stores: Stores) -> None:
        self.stores = stores


def register(server: grpc.Server, stores: Stores) -> Sequence[str]:
    optimization_pb2_grpc.add_OptimizationServiceServicer_to_server(OptimizationServicer(stores), server)
    return [optimization_pb2.DESCRIPTOR.services_by_name["OptimizationService"].full_name]
