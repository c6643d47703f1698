"""The generation engine: continuous batching at iteration level, one thread per model.

The engine only joins the parts. Request threads `submit` sequences into a queue; the engine thread
moves them into the scheduler and runs steps, each on the process's compute thread: the scheduler
(scheduler.py, no torch) says what the step is, the model runner (model_runner.py) executes it and
samples, the scheduler takes the sampled tokens back, and the output processor (output_processor.py)
finds stop sequences and feeds each request's stream. A step's description and the runner's answer
are plain data (step.py), so the runner can be replaced without touching scheduling.

One request never hurts another: a failure in computing one sequence fails that sequence alone, with
Finish.ERROR and a message its caller gets as an error status, while the others carry on. Its
sampling row, its sampler, its encoder pass (model_runner.py, sampling.py) and its detokenizing
(output_processor.py) are each its own. A failed packed forward pass is retried with each of its
sequences alone, so that only a sequence that fails alone fails (a batch-wide fault, say out of device
memory, then fails them one by one, and sequences not in that step are untouched). Only a failure
outside all of these (a scheduler bug, a KV copy between device and host) fails every active
sequence, with an error rather than a silent CANCELLED, and the engine serves on.

Requests that cannot be queued (the engine is at `kv_slots + max_queue_size` sequences) are refused
at once with RESOURCE_EXHAUSTED, so memory stays bounded under any load.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from fastserve.runtime.errors import ResourceExhausted, Unavailable
from fastserve.services.inference.compute import on_compute_thread
from fastserve.services.inference.decoder import Decoder
from fastserve.services.inference.generation_metrics import EngineMetrics
from fastserve.services.inference.generation_settings import GenerationSettings
from fastserve.services.inference.model_runner import ModelRunner
from fastserve.services.inference.output_processor import DECODE_FAILED, OutputProcessor
from fastserve.services.inference.sampling_params import SamplingParams
from fastserve.services.inference.scheduler import Scheduler
from fastserve.services.inference.sequence import Sequence
from fastserve.services.inference.step import RunnerOutput

log = logging.getLogger(__name__)


@dataclass
class StepStats:
    steps: int = 0
    tokens: int = 0
    compute_s: float = 0.0
    batch_sizes: dict[int, int] = field(default_factory=dict)
    preemptions: int = 0


class Engine:
    def __init__(self, name: str, decoder: Decoder, settings: GenerationSettings, eos_ids: set[int],
                 decode: Callable[[list[int]], str], max_kv_bytes: float = math.inf) -> None:
        self.name, self.settings = name, settings
        self.encoder_decoder, self.start_id = decoder.encoder_decoder, decoder.start_id
        self.context = settings.window(decoder.max_positions)
        self.metrics = EngineMetrics(name, settings.policy, settings.mlfq.levels if settings.policy == "mlfq" else 1)
        self.scheduler = Scheduler(settings, self.context, eos_ids, self.metrics)
        self.runner = ModelRunner(decoder, settings.slots(), self.context, settings.host_pool(), max_kv_bytes)
        self.outputs = OutputProcessor(decode, self.metrics)
        self.cache = self.scheduler.kv  # its sizes are the effective settings GetModelStatus reports
        self.incoming: list[Sequence] = []
        self.cond = threading.Condition()
        self.accepting = True
        self.stats = StepStats()
        # On a GPU kernels are asynchronous and there is no OpenMP team to share: the engine steps on its own
        # thread, so an encoder batch queued on the compute thread never delays a decode step.
        self.own_thread = decoder.device.type != "cpu"
        self.thread = threading.Thread(target=self._loop, daemon=True, name=f"engine-{name}")
        self.thread.start()

    # --- called from request threads -------------------------------------------------------------------------

    def submit(self, prompt: list[int], params: SamplingParams, priority: int = 0,
               deadline: float | None = None) -> Sequence:
        """One sequence (`params.n` is 1)."""
        [seq] = self.submit_group(prompt, replace(params, n=1), priority, deadline)
        return seq

    def submit_group(self, prompt: list[int], params: SamplingParams, priority: int = 0,
                     deadline: float | None = None) -> list[Sequence]:
        """The `params.n` sequences of one request, queued together or refused together. Completion i samples
        with seed + i, and the later ones copy the first's cached prompt (the scheduler's fork)."""
        seqs: list[Sequence] = []
        for index in range(params.n):
            own = params if index == 0 or params.seed is None else replace(params, seed=(params.seed + index) % 2**63)
            seq = (Sequence([self.start_id], own, priority, deadline, source=prompt) if self.encoder_decoder
                   else Sequence(prompt, own, priority, deadline))
            if seqs:
                seq.index, seq.leader, seq.events = index, seqs[0], seqs[0].events
            seqs.append(seq)
        with self.cond:
            if not self.accepting:
                raise Unavailable(f"model {self.name} is unloading")
            if not self.scheduler.has_room(len(self.incoming) + len(seqs) - 1):
                raise ResourceExhausted(f"{self.name} holds {self.scheduler.capacity} sequences, its limit; "
                                        "retry later")
            self.incoming.extend(seqs)
            self.cond.notify()
        return seqs

    def drain(self, timeout: float = 120.0) -> None:
        """Stop accepting, finish every sequence already in, then stop the thread."""
        with self.cond:
            self.accepting = False
            self.cond.notify()
        self.thread.join(timeout)

    # --- the engine thread ------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.incoming and not self.scheduler.has_work():
                    if not self.accepting:
                        return
                    self.cond.wait()
                for seq in self.incoming:
                    self.scheduler.add(seq)
                self.incoming.clear()
            try:
                if self.own_thread:
                    self.step()
                else:
                    # On CPU the whole step, scheduling included, is one hand-off to the compute thread (one
                    # OpenMP team: compute.py), measured no slower than handing off the runner alone.
                    on_compute_thread(self.step)
            except Exception as exc:  # noqa: BLE001 - the last resort (see the module docstring); serve on
                log.exception("generation step failed in %s", self.name)
                self.outputs.publish(self.scheduler.abort(f"the generation step failed ({type(exc).__name__})"))

    def step(self) -> None:
        step = self.scheduler.schedule()
        out, seconds = RunnerOutput(), 0.0
        if not step.empty:
            start = time.perf_counter()
            out = self.runner.execute(step)
            seconds = time.perf_counter() - start
        updates = self.scheduler.update_from_output(out)
        stops, failed = self.outputs.stopped(updates)  # stop sequences are text: the scheduler cannot see them
        for update in stops:
            self.scheduler.stop(update)
        for update in failed:
            self.scheduler.fail(update, DECODE_FAILED)
        self.outputs.publish(updates)
        if step.sequences:
            self._count_step(len(step.sequences), len(out.seq_ids), seconds)

    def _count_step(self, batch: int, tokens: int, seconds: float) -> None:
        s = self.stats
        s.steps += 1
        s.tokens += tokens
        s.compute_s += seconds
        s.batch_sizes[batch] = s.batch_sizes.get(batch, 0) + 1
        s.preemptions = self.scheduler.preemptions
        self.metrics.tokens.inc(tokens)
        self.metrics.occupancy.observe(batch / self.settings.max_batch_size)
        self.metrics.step_seconds.observe(seconds)
