"""Common runtime of the FastServe services: configuration, logging, the gRPC server factory,
error mapping, metrics, the artifact store, the job store and the Celery app."""
