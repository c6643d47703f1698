"""Benchmarks: each measures FastServe and its reference side by side in one run (`make bench-<name>`)."""
