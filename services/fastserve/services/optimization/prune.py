"""Pruning: unstructured magnitude pruning, and structured removal of attention heads and MLP channels.

Structured pruning really shrinks the tensors, so the model is smaller and faster, and it must survive
`save_pretrained` + loading. MLP widths are uniform across layers, so `n_inner` / `intermediate_size` in the
stock config describes them. Head counts are not: a head-pruned model becomes one of the pruned model types
of `fastserve.models.pruned`, whose config records the heads kept per layer, and which
`fastserve.models.loading` loads in any process. This module decides what to remove; how a pruned layer is
laid out is defined there, once. Nothing here knows of jobs or gRPC.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from fastserve.models import pruned
from fastserve.models.pruned import (
    PRUNED_CLASSES,
    PRUNED_CONFIGS,
    attention,
    blocks,
    conv1d,
    family_of,
    head_layout,
    linear,
)
from fastserve.runtime.errors import InvalidArgument
from fastserve.services.optimization.measure import count_parameters

PRUNABLE = (nn.Linear, Conv1D)


def _check_fraction(value: Any, field: str, allow_zero: bool) -> float:
    """A number in [0, 1) (or (0, 1)); bools and NaN are refused."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    low_ok = ok and (value >= 0 if allow_zero else value > 0)
    if not (low_ok and value < 1):
        bounds = "[0, 1)" if allow_zero else "(0, 1)"
        raise InvalidArgument(f"{field} must be a number in {bounds}, not {value!r}", field=field)
    return float(value)


# ---------------------------------------------------------------------------------------------------------------
# Unstructured magnitude pruning


def _prunable_weights(model: nn.Module) -> list[nn.Parameter]:
    """Weights of Linear/Conv1D layers, each once, leaving out those tied to an embedding (a GPT-2 lm_head is
    the token embedding: zeroing it would prune the embedding table)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    weights: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, PRUNABLE) and id(module.weight) not in embeddings:
            weights.setdefault(id(module.weight), module.weight)
    return list(weights.values())


@torch.no_grad()
def magnitude_prune(model: nn.Module, sparsity: float) -> dict:
    """Global unstructured magnitude pruning: zero the `sparsity` share of smallest-|w| weights over all
    Linear/Conv1D layers together (not embeddings, LayerNorm or biases).

    Written straight into the weights: no masks, `weight_orig` parameters or forward hooks are left, so the
    model saves, exports and quantizes like any other. One global threshold lets layers with many small weights
    lose more than sensitive ones. Ties at the threshold are broken in module order so exactly
    round(sparsity * n) weights are zeroed."""
    sparsity = _check_fraction(sparsity, "sparsity", allow_zero=True)
    weights = _prunable_weights(model)
    if not weights:
        raise InvalidArgument("the model has no Linear/Conv1D weights to prune", field="model")
    total = sum(w.numel() for w in weights)
    k = round(sparsity * total)
    if k > 0:
        magnitudes = torch.cat([w.detach().abs().flatten().float() for w in weights])
        threshold = torch.kthvalue(magnitudes, k).values
        ties_left = k - int((magnitudes < threshold).sum())
        del magnitudes
        for w in weights:
            magnitude = w.abs()
            mask = magnitude < threshold
            if ties_left > 0:
                ties = (magnitude == threshold).flatten().nonzero().flatten()[:ties_left]
                mask.view(-1)[ties] = True
                ties_left -= ties.numel()
            w.masked_fill_(mask, 0.0)
    zeros = sum(int((w == 0).sum()) for w in weights)
    return {"sparsity": zeros / total, "zeroed": k, "requested": sparsity, "weights": total,
            "tensors": len(weights), "params": count_parameters(model)}


# ---------------------------------------------------------------------------------------------------------------
# Attention heads


def _head_importance(attn: nn.Module, family: str) -> torch.Tensor:
    """L2 norm of each head's slice of the output projection: a head whose output is barely projected back into
    the residual stream contributes little, whatever its attention pattern."""
    heads, dim = head_layout(attn, family)
    if family == "gpt2":
        per_head = attn.c_proj.weight.detach().float().reshape(heads, dim, -1)  # [in = heads * dim, out]
    else:
        weight = attn.output.dense.weight.detach().float()  # [out, in = heads * dim]
        per_head = weight.T.reshape(heads, dim, -1)
    return per_head.flatten(1).norm(dim=1)


def prune_heads(model: nn.Module, fraction: float) -> dict:
    """Remove round(fraction * heads) of the least important attention heads in every layer (at least one
    head stays), slicing the q/k/v and output projections so the tensors really shrink. GPT-2 and BERT.

    The model's class and config become the pruned model types (see the module docstring), so
    `save_pretrained` + `fastserve.models.loading.load_model` give back this smaller model. They are
    registered with the Auto classes here too: this process now makes models of those types."""
    fraction = _check_fraction(fraction, "fraction", allow_zero=False)
    family = family_of(model)
    if family == "llama" or type(model) not in PRUNED_CLASSES:
        raise InvalidArgument(f"head pruning supports {', '.join(c.__name__ for c in PRUNED_CLASSES)}, "
                              f"not {type(model).__name__}", field="model")
    if getattr(model.config, "add_cross_attention", False):
        raise InvalidArgument("head pruning does not support cross-attention layers", field="model")
    before = count_parameters(model)
    heads_before, heads_after, removed = [], [], {}
    for index, block in enumerate(blocks(model, family)):
        attn = attention(block, family)
        heads, _ = head_layout(attn, family)
        drop = min(round(fraction * heads), heads - 1)
        order = torch.argsort(_head_importance(attn, family))  # least important first
        keep = torch.sort(order[drop:]).values
        if drop:
            pruned.resize_heads(attn, family, keep, len(keep))
            removed[index] = sorted(order[:drop].tolist())
        heads_before.append(heads)
        heads_after.append(len(keep))
    if removed:
        pruned.register()
        model.config.__class__ = PRUNED_CONFIGS[family]
        model.config.heads_per_layer = heads_after
        model.__class__ = PRUNED_CLASSES[type(model)]
    return {"params_before": before, "params_after": count_parameters(model), "heads_before": heads_before,
            "heads_after": heads_after, "removed_heads": removed, "fraction": fraction}


# ---------------------------------------------------------------------------------------------------------------
# MLP channels


def _mlp(block: nn.Module, family: str) -> tuple[list[nn.Module], nn.Module]:
    """(layers that produce the intermediate channels, the layer that consumes them)."""
    if family == "gpt2":
        return [block.mlp.c_fc], block.mlp.c_proj
    if family == "llama":
        return [block.mlp.gate_proj, block.mlp.up_proj], block.mlp.down_proj
    return [block.intermediate.dense], block.output.dense


def _out_rows(layer: nn.Module) -> torch.Tensor:
    """Weights per output feature, [out, in], whether Linear or Conv1D."""
    weight = layer.weight.detach().float()
    return weight.T if isinstance(layer, Conv1D) else weight


def _in_cols(layer: nn.Module) -> torch.Tensor:
    """Weights per input feature, [in, out], whether Linear or Conv1D."""
    weight = layer.weight.detach().float()
    return weight if isinstance(layer, Conv1D) else weight.T


def _channel_importance(producers: list[nn.Module], consumer: nn.Module) -> torch.Tensor:
    """||weights into the channel|| * ||weights out of it||: a channel that is either barely driven or barely
    read contributes little. (Gated MLPs: the gate and up rows count together.)"""
    into = torch.sqrt(sum(_out_rows(p).pow(2).sum(1) for p in producers))
    out_of = _in_cols(consumer).norm(dim=1)
    return into * out_of


def _slice_mlp(block: nn.Module, family: str, keep: torch.Tensor) -> None:
    if family == "gpt2":
        block.mlp.c_fc = conv1d(block.mlp.c_fc, out_idx=keep)
        block.mlp.c_proj = conv1d(block.mlp.c_proj, in_idx=keep)
    elif family == "llama":
        block.mlp.gate_proj = linear(block.mlp.gate_proj, rows=keep)
        block.mlp.up_proj = linear(block.mlp.up_proj, rows=keep)
        block.mlp.down_proj = linear(block.mlp.down_proj, cols=keep)
        block.mlp.intermediate_size = len(keep)
    else:
        block.intermediate.dense = linear(block.intermediate.dense, rows=keep)
        block.output.dense = linear(block.output.dense, cols=keep)


def prune_mlp_channels(model: nn.Module, fraction: float) -> dict:
    """Remove round(fraction * width) of the least important intermediate channels of every MLP (GPT-2
    c_fc/c_proj, Llama gate/up/down, BERT intermediate/output), the same number in every layer so the stock
    config (`n_inner` / `intermediate_size`, updated here) describes the model and save/load round-trips."""
    fraction = _check_fraction(fraction, "fraction", allow_zero=False)
    family = family_of(model)
    before = count_parameters(model)
    layers = blocks(model, family)
    width = _in_cols(_mlp(layers[0], family)[1]).shape[0]
    if any(_in_cols(_mlp(b, family)[1]).shape[0] != width for b in layers):
        raise InvalidArgument("MLP widths differ between layers; cannot describe the result in the config",
                              field="model")
    kept = max(1, width - round(fraction * width))
    for block in layers:
        producers, consumer = _mlp(block, family)
        order = torch.argsort(_channel_importance(producers, consumer), descending=True)
        keep = torch.sort(order[:kept]).values.to(consumer.weight.device)
        _slice_mlp(block, family, keep)
    if family == "gpt2":
        model.config.n_inner = kept
    else:
        model.config.intermediate_size = kept
    return {"params_before": before, "params_after": count_parameters(model), "intermediate_before": width,
            "intermediate_after": kept, "fraction": fraction}

