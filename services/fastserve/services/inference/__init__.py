"""The inference service (`fastserve.inference.v1`)."""
