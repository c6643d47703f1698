"""`python -m fastserve.services.training`: run the training service until SIGTERM."""

from fastserve.runtime.server import run_service
from fastserve.services.training.servicer import SERVICE, register

if __name__ == "__main__":
    run_service(SERVICE, register)
