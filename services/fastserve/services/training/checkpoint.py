"""Checkpoints without pickle: tensors in safetensors files, everything else in JSON.

A checkpoint folder holds the model (`model.safetensors`), the AdamW state (`optimizer.safetensors`
plus `optimizer.json` for its hyperparameters and step counts), the RNG states of every rank
(`rng.safetensors`: `torch.<rank>` and, on GPUs, `cuda.<rank>`) and `trainer.json`: the step, the data
position, the scheduler and the early-stopping state.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

MODEL, OPTIMIZER, OPTIMIZER_META, RNG, TRAINER = (
    "model.safetensors", "optimizer.safetensors", "optimizer.json", "rng.safetensors", "trainer.json")


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's RNG states: the CPU generator's and, on a GPU, its device's."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def save_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict[str, Any], rng: dict[str, torch.Tensor]) -> None:
    """`rng` holds every rank's `rng_state`, keyed `<name>.<rank>`."""
    folder.mkdir(parents=True, exist_ok=True)
    save_model(model, str(folder / MODEL))
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{index}.{key}"] = value
    save_file(tensors, str(folder / OPTIMIZER))
    (folder / OPTIMIZER_META).write_text(json.dumps({"param_groups": state["param_groups"], "scalars": scalars}))
    save_file({k: v.contiguous().cpu() for k, v in rng.items()}, str(folder / RNG))
    (folder / TRAINER).write_text(json.dumps(trainer_state))


def load_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    rank: int = 0) -> dict[str, Any]:
    """Restore model, optimizer and rank `rank`'s RNG from `folder`; return the trainer state to continue from."""
    device = next(model.parameters()).device
    load_model(model, str(folder / MODEL), device=str(device))
    meta = json.loads((folder / OPTIMIZER_META).read_text())
    tensors = load_file(str(folder / OPTIMIZER), device=str(device))
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        index, name = key.split(".", 1)
        # AdamW keeps `step` as a CPU tensor; the other moments live beside their parameter.
        state.setdefault(int(index), {})[name] = value.cpu() if name == "step" else value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    rng = load_file(str(folder / RNG))
    # Each rank's own stream: dropout then draws what it would have drawn had the run not stopped. A rank the
    # checkpoint has none for (saved by fewer ranks) keeps its seed; `torch` is rank 0's in older checkpoints.
    own = rng.get(f"torch.{rank}", rng.get("torch") if rank == 0 else None)
    if own is not None:
        torch.set_rng_state(own)
    if device.type == "cuda" and f"cuda.{rank}" in rng:
        torch.cuda.set_rng_state(rng[f"cuda.{rank}"], device)
    return json.loads((folder / TRAINER).read_text())
