"""`python -m fastserve.services.optimization`: run the optimization service until SIGTERM."""

from fastserve.runtime.server import run_service
from fastserve.services.optimization.servicer import SERVICE, register

if __name__ == "__main__":
    run_service(SERVICE, register)
