"""The preprocessing service (`fastserve.preprocessing.v1`)."""
