"""Pruning: unstructured magnitude pruning, and structured removal of attention heads and MLP channels.

Structured pruning really shrinks the tensors, so the model is smaller and faster, and it must survive
`save_pretrained` + `from_pretrained`. MLP widths are uniform across layers, so `n_inner` /
`intermediate_size` in the stock config describes them. Head counts are not: transformers 5 dropped
`config.pruned_heads` and `model.prune_heads`, and BERT and GPT-2 derive the head size from
`hidden_size / num_heads`, so no stock config can describe a head-pruned layer. A head-pruned model therefore
gets a config subclass (`fastserve_gpt2_pruned`, `fastserve_bert_pruned`) that records the heads kept per
layer, and model subclasses that build their attention at those sizes; both are registered with the Auto
classes when this module is imported, so `AutoModel*.from_pretrained(folder)` loads the smaller model in any
process that imported it. Nothing here knows of jobs or gRPC.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    GPT2Model,
)
from transformers.pytorch_utils import Conv1D

from services.optimization.measure import count_parameters
from shared.errors import InvalidArgument

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
# Architectures: where the attention and MLP layers are


def _family(model: nn.Module) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family = {"gpt2": "gpt2", PrunedGPT2Config.model_type: "gpt2", "bert": "bert",
              PrunedBertConfig.model_type: "bert", "llama": "llama"}.get(model_type)
    if family is None:
        raise InvalidArgument(f"structured pruning supports GPT-2, BERT and (MLP only) Llama, not {model_type!r}",
                              field="model")
    return family


def _blocks(model: nn.Module, family: str) -> list[nn.Module]:
    base = model.base_model
    return list({"gpt2": lambda: base.h, "bert": lambda: base.encoder.layer, "llama": lambda: base.layers}[family]())


def _like(module: nn.Module, new: nn.Module) -> nn.Module:
    """`new` on the device and in the dtype of `module` (meta while from_pretrained builds the model)."""
    return new.to(device=module.weight.device, dtype=module.weight.dtype)


def _linear(old: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None,
            out_features: int | None = None, in_features: int | None = None) -> nn.Linear:
    """A Linear with its output rows and/or input columns kept at the given indices (copying the weights),
    or, without indices, an empty one of the given size."""
    out_f = len(rows) if rows is not None else (out_features or old.out_features)
    in_f = len(cols) if cols is not None else (in_features or old.in_features)
    new = _like(old, nn.Linear(in_f, out_f, bias=old.bias is not None))
    if rows is None and cols is None:
        return new
    with torch.no_grad():
        weight = old.weight if rows is None else old.weight[rows]
        new.weight.copy_(weight if cols is None else weight[:, cols])
        if old.bias is not None:
            new.bias.copy_(old.bias if rows is None else old.bias[rows])
    return new


def _conv1d(old: Conv1D, in_idx: torch.Tensor | None = None, out_idx: torch.Tensor | None = None,
            nf: int | None = None, nx: int | None = None) -> Conv1D:
    """Conv1D (weight [in, out]) counterpart of `_linear`."""
    new_nf = len(out_idx) if out_idx is not None else (nf or old.nf)
    new_nx = len(in_idx) if in_idx is not None else (nx or old.nx)
    new = _like(old, Conv1D(new_nf, new_nx))
    if in_idx is None and out_idx is None:
        return new
    with torch.no_grad():
        weight = old.weight if in_idx is None else old.weight[in_idx]
        new.weight.copy_(weight if out_idx is None else weight[:, out_idx])
        new.bias.copy_(old.bias if out_idx is None else old.bias[out_idx])
    return new


def _head_slices(heads: torch.Tensor, head_dim: int, device: torch.device) -> torch.Tensor:
    """Feature indices of the given heads in a [heads * head_dim] axis."""
    offsets = torch.arange(head_dim, device=device)
    return (heads.to(device)[:, None] * head_dim + offsets).flatten()


# ---------------------------------------------------------------------------------------------------------------
# Attention heads


def _attention(block: nn.Module, family: str) -> nn.Module:
    return block.attn if family == "gpt2" else block.attention


def _head_layout(attn: nn.Module, family: str) -> tuple[int, int]:
    """(heads, head_dim) of one attention module as it is now."""
    if family == "gpt2":
        return attn.num_heads, attn.head_dim
    return attn.self.num_attention_heads, attn.self.attention_head_size


def _head_importance(attn: nn.Module, family: str) -> torch.Tensor:
    """L2 norm of each head's slice of the output projection: a head whose output is barely projected back into
    the residual stream contributes little, whatever its attention pattern."""
    heads, dim = _head_layout(attn, family)
    if family == "gpt2":
        per_head = attn.c_proj.weight.detach().float().reshape(heads, dim, -1)  # [in = heads * dim, out]
    else:
        weight = attn.output.dense.weight.detach().float()  # [out, in = heads * dim]
        per_head = weight.T.reshape(heads, dim, -1)
    return per_head.flatten(1).norm(dim=1)


def _resize_heads(attn: nn.Module, family: str, keep: torch.Tensor | None, count: int) -> None:
    """Keep the heads at `keep` (copying weights) or, with keep=None, rebuild empty at `count` heads."""
    heads, dim = _head_layout(attn, family)
    if family == "gpt2":
        device = attn.c_attn.weight.device
        width = heads * dim
        if keep is None:
            attn.c_attn = _conv1d(attn.c_attn, nf=3 * count * dim)
            attn.c_proj = _conv1d(attn.c_proj, nx=count * dim)
        else:
            features = _head_slices(keep, dim, device)
            qkv = torch.cat([features + part * width for part in range(3)])
            attn.c_attn = _conv1d(attn.c_attn, out_idx=qkv)
            attn.c_proj = _conv1d(attn.c_proj, in_idx=features)
        attn.num_heads, attn.split_size = count, count * dim
        return
    self_attn, output = attn.self, attn.output
    if keep is None:
        for name in ("query", "key", "value"):
            setattr(self_attn, name, _linear(getattr(self_attn, name), out_features=count * dim))
        output.dense = _linear(output.dense, in_features=count * dim)
    else:
        features = _head_slices(keep, dim, self_attn.query.weight.device)
        for name in ("query", "key", "value"):
            setattr(self_attn, name, _linear(getattr(self_attn, name), rows=features))
        output.dense = _linear(output.dense, cols=features)
    self_attn.num_attention_heads, self_attn.all_head_size = count, count * dim


def _apply_head_counts(model: nn.Module) -> None:
    """Build the attention of a pruned model at the sizes its config records (weights are loaded after)."""
    counts = getattr(model.config, "heads_per_layer", None)
    if not counts:
        return
    family = _family(model)
    for block, count in zip(_blocks(model, family), counts, strict=True):
        attn = _attention(block, family)
        if _head_layout(attn, family)[0] != count:
            _resize_heads(attn, family, None, count)


@strict
class PrunedGPT2Config(GPT2Config):
    """GPT-2 whose layers may have fewer heads than `n_head` (which still sets the head size)."""

    model_type = "fastserve_gpt2_pruned"
    heads_per_layer: list[int] | None = None


@strict
class PrunedBertConfig(BertConfig):
    """BERT whose layers may have fewer heads than `num_attention_heads` (which still sets the head size)."""

    model_type = "fastserve_bert_pruned"
    heads_per_layer: list[int] | None = None


class PrunedGPT2Model(GPT2Model):
    config_class = PrunedGPT2Config

    def __init__(self, config: PrunedGPT2Config) -> None:
        super().__init__(config)
        _apply_head_counts(self)


class PrunedGPT2LMHeadModel(GPT2LMHeadModel):
    config_class = PrunedGPT2Config

    def __init__(self, config: PrunedGPT2Config) -> None:
        super().__init__(config)
        _apply_head_counts(self)


class PrunedGPT2ForSequenceClassification(GPT2ForSequenceClassification):
    config_class = PrunedGPT2Config

    def __init__(self, config: PrunedGPT2Config) -> None:
        super().__init__(config)
        _apply_head_counts(self)


class PrunedBertModel(BertModel):
    config_class = PrunedBertConfig

    def __init__(self, config: PrunedBertConfig, add_pooling_layer: bool = True) -> None:
        super().__init__(config, add_pooling_layer=add_pooling_layer)
        _apply_head_counts(self)


class PrunedBertForSequenceClassification(BertForSequenceClassification):
    config_class = PrunedBertConfig

    def __init__(self, config: PrunedBertConfig) -> None:
        super().__init__(config)
        _apply_head_counts(self)


# stock class -> its head-pruned counterpart (a pruned class maps to itself: pruning again is fine)
_PRUNED_CLASSES: dict[type, type] = {
    GPT2Model: PrunedGPT2Model, GPT2LMHeadModel: PrunedGPT2LMHeadModel,
    GPT2ForSequenceClassification: PrunedGPT2ForSequenceClassification,
    BertModel: PrunedBertModel, BertForSequenceClassification: PrunedBertForSequenceClassification,
}
_PRUNED_CLASSES |= {cls: cls for cls in list(_PRUNED_CLASSES.values())}
_PRUNED_CONFIGS = {"gpt2": PrunedGPT2Config, "bert": PrunedBertConfig}


def _register() -> None:
    for config_class, classes in ((PrunedGPT2Config, (PrunedGPT2Model, PrunedGPT2LMHeadModel,
                                                      PrunedGPT2ForSequenceClassification)),
                                  (PrunedBertConfig, (PrunedBertModel, None, PrunedBertForSequenceClassification))):
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        for auto, cls in zip((AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification), classes,
                             strict=True):
            if cls is not None:
                auto.register(config_class, cls, exist_ok=True)


_register()


def prune_heads(model: nn.Module, fraction: float) -> dict:
    """Remove round(fraction * heads) of the least important attention heads in every layer (at least one
    head stays), slicing the q/k/v and output projections so the tensors really shrink. GPT-2 and BERT.

    The model's class and config become the registered pruned variants (see the module docstring), so
    `save_pretrained` + `AutoModel*.from_pretrained` give back this smaller model."""
    fraction = _check_fraction(fraction, "fraction", allow_zero=False)
    family = _family(model)
    if family == "llama" or type(model) not in _PRUNED_CLASSES:
        raise InvalidArgument(f"head pruning supports {', '.join(c.__name__ for c in _PRUNED_CLASSES)}, "
                              f"not {type(model).__name__}", field="model")
    if getattr(model.config, "add_cross_attention", False):
        raise InvalidArgument("head pruning does not support cross-attention layers", field="model")
    before = count_parameters(model)
    heads_before, heads_after, removed = [], [], {}
    for index, block in enumerate(_blocks(model, family)):
        attn = _attention(block, family)
        heads, _ = _head_layout(attn, family)
        drop = min(round(fraction * heads), heads - 1)
        order = torch.argsort(_head_importance(attn, family))  # least important first
        keep = torch.sort(order[drop:]).values
        if drop:
            _resize_heads(attn, family, keep, len(keep))
            removed[index] = sorted(order[:drop].tolist())
        heads_before.append(heads)
        heads_after.append(len(keep))
    if removed:
        model.config.__class__ = _PRUNED_CONFIGS[family]
        model.config.heads_per_layer = heads_after
        model.__class__ = _PRUNED_CLASSES[type(model)]
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
        block.mlp.c_fc = _conv1d(block.mlp.c_fc, out_idx=keep)
        block.mlp.c_proj = _conv1d(block.mlp.c_proj, in_idx=keep)
    elif family == "llama":
        block.mlp.gate_proj = _linear(block.mlp.gate_proj, rows=keep)
        block.mlp.up_proj = _linear(block.mlp.up_proj, rows=keep)
        block.mlp.down_proj = _linear(block.mlp.down_proj, cols=keep)
        block.mlp.intermediate_size = len(keep)
    else:
        block.intermediate.dense = _linear(block.intermediate.dense, rows=keep)
        block.output.dense = _linear(block.output.dense, cols=keep)


def prune_mlp_channels(model: nn.Module, fraction: float) -> dict:
    """Remove round(fraction * width) of the least important intermediate channels of every MLP (GPT-2
    c_fc/c_proj, Llama gate/up/down, BERT intermediate/output), the same number in every layer so the stock
    config (`n_inner` / `intermediate_size`, updated here) describes the model and save/load round-trips."""
    fraction = _check_fraction(fraction, "fraction", allow_zero=False)
    family = _family(model)
    before = count_parameters(model)
    blocks = _blocks(model, family)
    width = _in_cols(_mlp(blocks[0], family)[1]).shape[0]
    if any(_in_cols(_mlp(b, family)[1]).shape[0] != width for b in blocks):
        raise InvalidArgument("MLP widths differ between layers; cannot describe the result in the config",
                              field="model")
    kept = max(1, width - round(fraction * width))
    for block in blocks:
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

