"""`python -m services.inference`: run the inference service until SIGTERM."""

from services.inference.servicer import SERVICE, register
from shared.server import run_service

if __name__ == "__main__":
    run_service(SERVICE, register)
