"""`python -m services.preprocessing`: run the preprocessing service until SIGTERM."""

from services.preprocessing.servicer import SERVICE, register
from shared.server import run_service

if __name__ == "__main__":
    run_service(SERVICE, register)
