"""The local stack: its processes (`fastserve up`, `down`, `status`), the demo, and their commands."""
