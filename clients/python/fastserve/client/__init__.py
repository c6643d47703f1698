"""A typed Python client of FastServe: thin wrappers over the generated stubs of every service.

    from fastserve.client import FastServeClient

    with FastServeClient("127.0.0.1") as fs:
        vectors = fs.inference.embed("all-MiniLM-L6-v2", ["hello"]).embeddings
        job = fs.training.submit_training_job(...)
        for event in fs.training.watch_job(job.job_id):
            ...

Failed calls raise `ClientError`; idempotent calls are retried on UNAVAILABLE per `RetryPolicy`.
"""

from fastserve.client.calls import RetryPolicy
from fastserve.client.client import FastServeClient
from fastserve.client.errors import ClientError
from fastserve.client.inference import InferenceClient, sampling_params
from fastserve.client.jobs import TERMINAL, JobClient, state_name
from fastserve.client.optimization import OptimizationClient
from fastserve.client.preprocessing import PreprocessingClient
from fastserve.client.training import TrainingClient

__all__ = ["TERMINAL", "ClientError", "FastServeClient", "InferenceClient", "JobClient", "OptimizationClient",
           "PreprocessingClient", "RetryPolicy", "TrainingClient", "sampling_params", "state_name"]
