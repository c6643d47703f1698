"""`python -m fastserve.services.preprocessing`: run the preprocessing service until SIGTERM."""

from fastserve.runtime.server import run_service
from fastserve.services.preprocessing.servicer import SERVICE, register

if __name__ == "__main__":
    run_service(SERVICE, register)
