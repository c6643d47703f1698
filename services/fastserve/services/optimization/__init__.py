"""The optimization service (`fastserve.optimization.v1`)."""
