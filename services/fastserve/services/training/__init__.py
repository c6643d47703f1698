"""The training service (`fastserve.training.v1`)."""
