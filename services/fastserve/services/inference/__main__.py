"""`python -m fastserve.services.inference`: run the inference service until SIGTERM."""

from fastserve.runtime.server import run_service
from fastserve.services.inference.servicer import SERVICE, register

if __name__ == "__main__":
    run_service(SERVICE, register)
