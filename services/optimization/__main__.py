"""`python -m services.optimization`: run the optimization service until SIGTERM."""

from services.optimization.servicer import SERVICE, register
from shared.server import run_service

if __name__ == "__main__":
    run_service(SERVICE, register)
