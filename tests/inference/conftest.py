"""Fixtures shared by the inference tests: channels and stubs to the `server` each module starts."""

import grpc
import pytest

from fastserve.inference.v1 import inference_pb2_grpc
from fastserve.kserve.v2 import grpc_service_pb2_grpc


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.target) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return inference_pb2_grpc.InferenceServiceStub(channel)


@pytest.fixture(scope="module")
def kserve(channel):
    return grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
