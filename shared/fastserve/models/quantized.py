"""The torchao-quantized model folder: how it is written and read back, without pickle.

A torchao-quantized model's Linear weights are torchao tensor subclasses. torchao 0.18's safetensors support
flattens those into plain tensors plus JSON metadata in the safetensors header, so `save_quantized_torch`
writes `model.safetensors` (no pickle anywhere) with `config.json` and a `quantization.json` recipe;
`load_quantized_torch` rebuilds the tensor subclasses from that metadata (no re-quantization, so the loaded
model is bit-identical to the saved one).

Saving and loading are one format, so both live here; optimization quantizes (`quantize_torch` marks the
model with the recipe saved here) and every service loads through `fastserve.models.loading`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from fastserve.runtime.errors import FailedPrecondition, InvalidArgument

RECIPE_FILE = "quantization.json"
FORMAT = "torchao-safetensors"


def is_quantized(folder: Path) -> bool:
    return (Path(folder) / RECIPE_FILE).is_file()


def conv1d_to_linear(model: nn.Module) -> int:
    """Replace transformers' Conv1D (GPT-2: a Linear with a transposed weight) by nn.Linear, which torchao
    quantizes. Exact; returns how many were replaced."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                linear = nn.Linear(child.nx, child.nf, device=child.weight.device, dtype=child.weight.dtype)
                with torch.no_grad():
                    linear.weight.copy_(child.weight.T)
                    linear.bias.copy_(child.bias)
                setattr(parent, name, linear)
                replaced += 1
    return replaced


def _state_without_aliases(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict with each shared tensor once (safetensors refuses aliases), and alias -> kept name."""
    state: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[int, str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():  # the Parameters themselves: ids identify ties
        if id(tensor) in seen:
            aliases[name] = seen[id(tensor)]
            continue
        seen[id(tensor)] = name
        plain = tensor.detach().to("cpu")
        state[name] = plain.contiguous() if type(plain) is torch.Tensor else plain
    return state, aliases


def save_quantized_torch(model: nn.Module, out_dir: Path) -> None:
    """Write model.safetensors (torchao tensors flattened by torchao's safetensors support), config.json and
    quantization.json (method, aliases of tied weights, versions). No pickle."""
    import torchao
    from safetensors.torch import save_file
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    recipe = getattr(model, "_fastserve_quantization", None)
    if recipe is None:
        raise InvalidArgument("the model was not quantized with quantize_torch", field="model")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state, aliases = _state_without_aliases(model)
    tensors, metadata = flatten_tensor_state_dict(state)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / "model.safetensors"), metadata=metadata)
    model.config.save_pretrained(str(out_dir))
    meta = {"format": FORMAT, "library": "torchao", "torchao_version": torchao.__version__,
            "method": recipe["method"], "conv1d_converted": recipe["conv1d_converted"], "modules": recipe["modules"],
            "aliases": aliases, "architectures": [type(model).__name__]}
    (out_dir / RECIPE_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def load_quantized_torch(model_dir: Path, auto_class: Any, config: Any = None) -> nn.Module:
    """Rebuild a model saved by `save_quantized_torch`: the architecture from `config` (default: the folder's
    config.json, via `auto_class`, e.g. AutoModel), then the torchao tensors from the safetensors metadata.
    On CPU; move it after. Use `fastserve.models.loading.load_model`, which also knows pruned architectures."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict
    from transformers import AutoConfig

    model_dir = Path(model_dir)
    recipe_path = model_dir / RECIPE_FILE
    if not recipe_path.is_file():
        raise InvalidArgument(f"{model_dir} has no {RECIPE_FILE}: not a torchao-quantized model", field="model")
    recipe = json.loads(recipe_path.read_text())
    if recipe.get("format") != FORMAT:
        raise InvalidArgument(f"unknown quantized format {recipe.get('format')!r}", field="model")
    model = auto_class.from_config(config or AutoConfig.from_pretrained(str(model_dir))).eval()
    if recipe["conv1d_converted"]:
        conv1d_to_linear(model)
    path = model_dir / "model.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    state, leftover = unflatten_tensor_state_dict(load_file(str(path)), metadata)
    if leftover:
        raise FailedPrecondition(f"unexpected tensors in {path.name}: {sorted(leftover)[:5]}")
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if k not in recipe["aliases"]]
    if missing or unexpected:
        raise FailedPrecondition(f"{path.name} does not match the architecture: missing {missing[:5]}, "
                                 f"unexpected {unexpected[:5]}")
    for alias, source in recipe["aliases"].items():
        _tie(model, alias, source)
    for param in model.parameters():
        if type(param) not in (nn.Parameter, torch.Tensor):  # a torchao tensor: not trainable, as quantize_ left it
            param.requires_grad_(False)
    model._fastserve_quantization = {k: recipe[k] for k in ("method", "conv1d_converted", "modules")}
    model._fastserve_quantization["device"] = "cpu"
    return model


def _tie(model: nn.Module, alias: str, source: str) -> None:
    """Point `alias` at the very tensor `source` is (tied weights stay tied after loading)."""
    owner_name, _, attr = alias.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    src_owner_name, _, src_attr = source.rpartition(".")
    src_owner = model.get_submodule(src_owner_name) if src_owner_name else model
    value = getattr(src_owner, src_attr)
    if isinstance(value, nn.Parameter):
        setattr(owner, attr, value)
    else:
        owner.register_buffer(attr, value)
