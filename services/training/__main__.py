"""`python -m services.training`: run the training service until SIGTERM."""

from services.training.servicer import SERVICE, register
from shared.server import run_service

if __name__ == "__main__":
    run_service(SERVICE, register)
