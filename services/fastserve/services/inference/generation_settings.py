"""A generative model's engine settings (`ModelConfig.batching` and `.generation`), checked when it loads.

Plain data, shared by the scheduler (batch size, prefill budget, queue, policy), the model runner
(slots and their length) and the engine; no torch, so the scheduler can be built and tested without it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fastserve.runtime.errors import InvalidArgument
from fastserve.services.inference.scheduling import MlfqSettings

MAX_CONTEXT = 2048  # tokens per slot; documented with the other bounds on the proto's GenerationConfig
MAX_SEQUENCES = 1024  # max_batch_size, kv_slots
MAX_QUEUE = 65536
MAX_HOST_SLOTS = 4096
MAX_PREFILL_TOKENS = 8192
MAX_MLFQ_LEVELS = 16
MAX_QUANTUM = 1 << 16
MAX_STARVATION_MS = 3_600_000


@dataclass(frozen=True)
class GenerationSettings:
    policy: str = "fcfs"  # or mlfq
    max_batch_size: int = 32  # sequences in one step
    kv_slots: int = 0  # sequences whose cache is resident; 0: max_batch_size (twice that for mlfq)
    host_slots: int = -1  # evicted caches kept in host memory; -1: as many as kv_slots
    context: int = 0  # tokens per slot (prompt + completion); 0: the model's window, at most 2048
    max_queue_size: int = 256  # sequences waiting beyond the resident ones
    max_prefill_tokens: int = 256  # prompt tokens per step
    mlfq: MlfqSettings = field(default_factory=MlfqSettings)
    chat_template: str = ""  # one a load gives in place of the folder's; empty: the folder's

    def slots(self) -> int:
        return self.kv_slots or self.max_batch_size * (2 if self.policy == "mlfq" else 1)

    def host_pool(self) -> int:
        return self.slots() if self.host_slots < 0 else self.host_slots

    def window(self, max_positions: int) -> int:
        """Tokens per slot for a model whose window is `max_positions`."""
        return min(self.context or max_positions, max_positions, MAX_CONTEXT)

    def check(self) -> None:
        """Refuse settings no engine can run, or out of their documented bounds, naming the ModelConfig field."""
        for name, value, least, most in (
                ("batching.max_batch_size", self.max_batch_size, 1, MAX_SEQUENCES),
                ("batching.max_queue_size", self.max_queue_size, 0, MAX_QUEUE),
                ("generation.kv_slots", self.kv_slots, 0, MAX_SEQUENCES),
                ("generation.context", self.context, 0, MAX_CONTEXT),
                ("generation.max_prefill_tokens", self.max_prefill_tokens, 1, MAX_PREFILL_TOKENS),
                ("generation.host_slots", self.host_slots, -1, MAX_HOST_SLOTS),
                ("generation.mlfq_levels", self.mlfq.levels, 1, MAX_MLFQ_LEVELS),
                ("generation.mlfq_base_quantum", self.mlfq.base_quantum, 1, MAX_QUANTUM),
                ("generation.mlfq_starvation_ms", self.mlfq.starvation_ms, 1, MAX_STARVATION_MS),
                ("generation.mlfq_oldest_places", self.mlfq.oldest_places, 0, MAX_SEQUENCES)):
            if not least <= value <= most:
                raise InvalidArgument(f"{name} must be in [{least}, {most}], got {value}", field=f"config.{name}")
