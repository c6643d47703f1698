"""gRPC servicer of `fastserve.training.v1.TrainingService`: translates protobuf to the core and back."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from fastserve.training.v1 import training_pb2, training_pb2_grpc
from shared.job_rpcs import JobRpcs
from shared.stores import Stores

SERVICE = "training"


class TrainingServicer(JobRpcs, training_pb2_grpc.TrainingServiceServicer):
    """Job RPCs come from JobRpcs; RPCs not yet built answer UNIMPLEMENTED (the generated default)."""

    service = SERVICE
    pb2 = training_pb2

    def __init__(self, stores: Stores) -> None:
        self.stores = stores


def register(server: grpc.Server, stores: Stores) -> Sequence[str]:
    training_pb2_grpc.add_TrainingServiceServicer_to_server(TrainingServicer(stores), server)
    return [training_pb2.DESCRIPTOR.services_by_name["TrainingService"].full_name]
