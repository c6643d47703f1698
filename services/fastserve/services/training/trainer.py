"""The training loop: AdamW, warmup then linear/cosine/constant decay, gradient accumulation and
clipping, autocast, periodic evaluation, early stopping, checkpoints and resumption. Plain PyTorch and
transformers; it reports through `Hooks` and knows nothing of jobs, Celery or gRPC.

With `world > 1` it runs under `torch.distributed` (DDP); rank 0 evaluates, reports and checkpoints,
and a stop request on rank 0 reaches every rank through an all-reduce at each step.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from transformers import get_scheduler

from fastserve.runtime.errors import FailedPrecondition
from fastserve.services.training.checkpoint import load_checkpoint, rng_state, save_checkpoint
from fastserve.services.training.data import Position, Sampler, SplitView, to_batch, tokens_in
from fastserve.services.training.spec import Hyperparameters


class Hooks(Protocol):
    def report(self, step: int, total: int, metrics: dict[str, Any]) -> None:
        """Progress and METRICS: loss, learning rate, tokens/s, eval results, ETA."""

    def should_stop(self) -> bool:
        """True once the job was cancelled."""

    def checkpoint(self, step: int, write: Callable[[Path], None]) -> str:
        """Publish a checkpoint (`write` fills a folder); returns where it went."""


class Stopped(Exception):
    """Training stopped on request; a checkpoint of the last step was saved."""

    def __init__(self, step: int, checkpoint: str) -> None:
        super().__init__(f"stopped at step {step}")
        self.step, self.checkpoint = step, checkpoint


@dataclass
class Outcome:
    steps: int
    metrics: dict[str, Any]
    early_stopped: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if device.type == "cuda":
        if precision in ("auto", "bf16"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else (None if precision == "auto" else
                                                                          torch.bfloat16)
        return torch.float16 if precision == "fp16" else None
    if precision == "fp16":
        raise FailedPrecondition("fp16 autocast needs a GPU; use bf16 or fp32 on CPU workers")
    return torch.bfloat16 if precision == "bf16" else None


class Trainer:
    def __init__(self, model: torch.nn.Module, task: str, hyper: Hyperparameters, train: SplitView,
                 validation: SplitView | None, pad_id: int, device: torch.device, rank: int = 0,
                 world: int = 1) -> None:
        self.model, self.task, self.hyper, self.pad_id = model, task, hyper, pad_id
        self.train_view, self.validation, self.device, self.rank, self.world = train, validation, device, rank, world
        self.sampler = Sampler(train.rows, hyper.batch_size, hyper.seed, rank, world)
        self.steps_per_epoch = max(self.sampler.per_epoch // hyper.gradient_accumulation_steps, 1)
        epochs_total = (hyper.epochs or (0 if hyper.max_steps else 1)) * self.steps_per_epoch
        self.total_steps = min(s for s in (hyper.max_steps, epochs_total) if s) if hyper.max_steps or \
            epochs_total else self.steps_per_epoch
        self.ddp = (torch.nn.parallel.DistributedDataParallel(model) if world > 1 else None)
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": hyper.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=hyper.learning_rate)
        self.scheduler = get_scheduler(hyper.lr_schedule, self.optimizer, num_warmup_steps=hyper.warmup_steps,
                                       num_training_steps=self.total_steps)
        self.amp = autocast_dtype(hyper.precision, device)
        self.scaler = torch.amp.GradScaler(enabled=self.amp is torch.float16)
        self.step, self.position, self.tokens = 0, Position(), 0
        self.best_eval, self.bad_evals = math.inf, 0
        self.history: list[dict[str, Any]] = []
        self.last_train: dict[str, Any] = {}
        self.last_eval: dict[str, Any] = {}
        self._rng: dict[str, torch.Tensor] = {}

    # -- state ---------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.position.epoch, "batch": self.position.batch,
                "tokens": self.tokens, "best_eval": None if math.isinf(self.best_eval) else self.best_eval,
                "bad_evals": self.bad_evals, "scheduler": self.scheduler.state_dict(), "history": self.history}

    def save(self, folder: Path) -> None:
        save_checkpoint(folder, self.model, self.optimizer, self.state(), self._rng)

    def _checkpoint(self, hooks: Hooks) -> str:
        """Checkpoint this step; every rank calls it at the same step, as it gathers every rank's RNG states
        for rank 0 to save (each rank draws its own dropout masks, and must go on with them after a resume)."""
        mine = rng_state(self.device)
        if self.world == 1:
            self._rng = {f"{k}.0": v for k, v in mine.items()}
        else:
            self._rng = {}
            for key, state in mine.items():
                local = state.to(self.device)  # NCCL gathers device tensors only
                parts = [torch.empty_like(local) for _ in range(self.world)]
                dist.all_gather(parts, local)
                self._rng.update({f"{key}.{r}": part.cpu() for r, part in enumerate(parts)})
        return hooks.checkpoint(self.step, self.save) if self.rank == 0 else ""

    def resume(self, folder: Path) -> None:
        state = load_checkpoint(folder, self.model, self.optimizer, self.rank)
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.tokens = state["step"], state["tokens"]
        self.position = Position(state["epoch"], state["batch"])
        self.best_eval = math.inf if state["best_eval"] is None else state["best_eval"]
        self.bad_evals, self.history = state["bad_evals"], state["history"]

    # -- the loop ------------------------------------------------------------------------------

    def _forward(self, rows: np.ndarray, module: torch.nn.Module) -> tuple[torch.Tensor, int]:
        batch = to_batch(self.train_view.take(rows), self.task, self.pad_id, self.device)
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            return module(**batch).loss, tokens_in(batch)

    def _stop_requested(self, hooks: Hooks) -> bool:
        stop = hooks.should_stop() if self.rank == 0 else False
        if self.world > 1:
            flag = torch.tensor([1.0 if stop else 0.0], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item())
        return stop

    def run(self, hooks: Hooks) -> Outcome:
        module = self.ddp or self.model
        accum = self.hyper.gradient_accumulation_steps
        window_start, window_tokens, window_loss, window_steps = time.perf_counter(), 0, 0.0, 0
        loop_start, start_step, start_tokens = time.perf_counter(), self.step, self.tokens
        early = False
        while self.step < self.total_steps:
            if self._stop_requested(hooks):
                raise Stopped(self.step, self._checkpoint(hooks))
            self.model.train()
            epoch_before = self.position.epoch
            step_loss = 0.0
            for micro in range(accum):
                rows = self.sampler.rows_at(self.position)
                self.position = self.sampler.advance(self.position)
                sync = micro == accum - 1 or self.ddp is None
                with contextlib.nullcontext() if sync else module.no_sync():
                    loss, tokens = self._forward(rows, module)
                    self.scaler.scale(loss / accum).backward()
                step_loss += float(loss.detach()) / accum
                window_tokens += tokens * self.world
            if self.hyper.max_grad_norm:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.hyper.max_grad_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            window_loss, window_steps = window_loss + step_loss, window_steps + 1
            last = self.step == self.total_steps
            log_due = self.step % self.hyper.log_interval_steps == 0 or last
            if log_due and self.world > 1:
                # Report the loss of the global batch, not of rank 0's slice of it.
                mean = torch.tensor([window_loss], dtype=torch.float64)
                dist.all_reduce(mean)
                window_loss = float(mean) / self.world
            if self.rank == 0 and log_due:
                elapsed = time.perf_counter() - window_start
                self.tokens += window_tokens
                per_step = (time.perf_counter() - loop_start) / max(self.step - start_step, 1)
                metrics = {"step": self.step, "epoch": self.position.epoch, "loss": window_loss / window_steps,
                           "learning_rate": self.scheduler.get_last_lr()[0],
                           "tokens_per_second": window_tokens / elapsed if elapsed else 0.0,
                           "tokens": self.tokens, "eta_seconds": per_step * (self.total_steps - self.step)}
                self.history.append({"step": self.step, "loss": metrics["loss"]})
                self.last_train = metrics
                hooks.report(self.step, self.total_steps, metrics)
            if log_due:
                window_start, window_tokens, window_loss, window_steps = time.perf_counter(), 0, 0.0, 0
            epoch_done = self.position.epoch != epoch_before
            eval_due = (self.step % self.hyper.eval_interval_steps == 0) if self.hyper.eval_interval_steps \
                else epoch_done
            if self.validation is not None and (eval_due or last):
                early = self._evaluate(hooks) or early
                if early:
                    break
            if self.step % self.hyper.checkpoint_interval_steps == 0 and not last:
                self._checkpoint(hooks)
        seconds = time.perf_counter() - loop_start
        return Outcome(self.step, {**self.last_train, **self.last_eval, "train_seconds": seconds,
                                   "run_tokens": self.tokens - start_tokens}, early, self.history)

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Loss over the validation split (its first `eval_batches` batches), token-weighted, with
        perplexity for language models and accuracy for classifiers."""
        self.model.eval()
        size, view = self.hyper.batch_size, self.validation
        batches = -(-view.rows // size)
        if self.hyper.eval_batches:
            batches = min(batches, self.hyper.eval_batches)
        total_loss, weight, correct, seen = 0.0, 0, 0, 0
        for b in range(batches):
            rows = np.arange(b * size, min((b + 1) * size, view.rows))
            batch = to_batch(view.take(rows), self.task, self.pad_id, self.device)
            with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                out = self.model(**batch)
            n = len(rows) if self.task == "sequence_classification" else tokens_in(batch)
            total_loss, weight = total_loss + float(out.loss) * n, weight + n
            if self.task == "sequence_classification":
                correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
                seen += len(rows)
        loss = total_loss / max(weight, 1)
        result: dict[str, Any] = {"eval_loss": loss}
        if self.task == "sequence_classification":
            result["eval_accuracy"] = correct / max(seen, 1)
        else:
            result["eval_perplexity"] = math.exp(min(loss, 50.0))
        return result

    def _evaluate(self, hooks: Hooks) -> bool:
        """Evaluate on rank 0 and report; True when early stopping says to stop (on every rank)."""
        stop = False
        if self.rank == 0:
            self.last_eval = self.evaluate()
            if self.last_eval["eval_loss"] < self.best_eval - 1e-6:
                self.best_eval, self.bad_evals = self.last_eval["eval_loss"], 0
            else:
                self.bad_evals += 1
            patience = self.hyper.early_stopping_patience
            stop = bool(patience and self.bad_evals >= patience)
            self.history.append({"step": self.step, **self.last_eval})
            hooks.report(self.step, self.total_steps, {"step": self.step, **self.last_eval, "early_stop": stop})
        if self.world > 1:
            flag = torch.tensor([1.0 if stop else 0.0], device=self.device)
            dist.broadcast(flag, src=0)
            stop = bool(flag.item())
        return stop
