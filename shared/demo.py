"""`make demo`: bring the stack up, call every service over gRPC, bring it down.

The end-to-end issue grows this into the whole pipeline; for now it shows the running system: every
service's health, the services reflection lists, a job listing from each service that runs jobs, and
an embedding from the model the inference service serves by default.
"""

from __future__ import annotations

import importlib

from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from shared.channels import health_status, open_channel
from shared.config import JOB_SERVICES, SERVICES, Config
from shared.stack import Stack


def run_demo(config: Config) -> int:
    stack = Stack(config)
    print("== bringing the stack up")
    stack.up()
    try:
        for service in SERVICES:
            with open_channel(f"127.0.0.1:{config.port(service)}", config) as channel:
                names = sorted(ProtoReflectionDescriptorDatabase(channel).get_services())
                line = f"{service:<14} port {config.port(service)}  health {health_status(channel)}  services {names}"
                if service in JOB_SERVICES:
                    pb2 = importlib.import_module(f"fastserve.{service}.v1.{service}_pb2")
                    grpc_mod = importlib.import_module(f"fastserve.{service}.v1.{service}_pb2_grpc")
                    stub = getattr(grpc_mod, f"{service.capitalize()}ServiceStub")(channel)
                    jobs = stub.ListJobs(pb2.ListJobsRequest(), timeout=10)
                    line += f"  jobs {jobs.page.total_size}"
                if service == "inference":
                    from fastserve.inference.v1 import inference_pb2, inference_pb2_grpc

                    reply = inference_pb2_grpc.InferenceServiceStub(channel).Embed(inference_pb2.EmbedRequest(
                        model="all-MiniLM-L6-v2", texts=["FastServe takes a model from raw text to an endpoint."]),
                        timeout=60)
                    line += f"  embedding dim {reply.dimension}"
                print(line)
    finally:
        print("== bringing the stack down")
        print("stopped:", ", ".join(stack.down()))
    return 0
