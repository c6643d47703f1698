"""The scheduler's ledger of the KV cache: which slots are free and how many evicted caches sit in
host memory. The tensors themselves are the model runner's (kv_cache.py); deciding where a sequence's
cache goes needs only these counts, so the scheduler keeps them and tells the runner what to copy.

The lowest free slot is handed out first, so the slots in use stay packed at the front and a decode
step can attend over a view of the first slots without gathering.
"""

from __future__ import annotations

import heapq


class KVSlots:
    def __init__(self, slots: int, host_slots: int) -> None:
        self.slots, self.host_slots = slots, host_slots
        self.free = list(range(slots))
        heapq.heapify(self.free)
        self.on_host = 0  # evicted caches in host memory now

    def allocate(self) -> int | None:
        return heapq.heappop(self.free) if self.free else None

    def release(self, slot: int) -> None:
        heapq.heappush(self.free, slot)

    def take_host_place(self) -> bool:
        """Count one more cache in host memory; False when the pool is full (recompute instead)."""
        if self.on_host >= self.host_slots:
            return False
        self.on_host += 1
        return True

    def release_host_place(self) -> None:
        """A host copy was restored, or dropped with its finished sequence."""
        self.on_host -= 1
