"""`python -m fastserve.services.inference`: run the inference service until SIGTERM."""

import os

# Tokenizers' own thread pool (rayon) would be one more team of threads wanting the cores the forward
# pass's OpenMP team needs; requests already come in parallel, each with a few texts. Measured on 2 shared
# cores, 32 clients, rounds of make bench-inference: with it off, served 0.64-0.86 of in-process and
# unbatched 29-33/s; with it on, 0.54-0.73 and 21-26/s. Set at process start, before any tokenizer loads.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from fastserve.runtime.server import run_service  # noqa: E402 - after the setting above
from fastserve.services.inference.servicer import SERVICE, register  # noqa: E402

if __name__ == "__main__":
    run_service(SERVICE, register)
