"""Head-pruned model types: how a folder whose layers kept different numbers of attention heads is built.

transformers 5 dropped `config.pruned_heads` and `model.prune_heads`, and BERT and GPT-2 derive the head size
from `hidden_size / num_heads`, so no stock config can describe a head-pruned layer. A head-pruned model
therefore has a config subclass (`fastserve_gpt2_pruned`, `fastserve_bert_pruned`) that records the heads
kept per layer, and model subclasses that build their attention at those sizes before the weights load.

Registering these with the Auto classes is explicit: `fastserve.models.loading` calls `register()` when a
folder's config.json names one of `MODEL_TYPES`, and optimization's pruning calls it when it makes such a
model. Importing this module registers nothing, so whether a pruned folder loads never depends on which
modules a process happened to import.

The layout helpers (where a family keeps its blocks, attention and projections; resizing a Linear or a
Conv1D) live here because building a pruned layer and pruning one must agree on them exactly; how to choose
what to prune stays in the optimization service.
"""

from __future__ import annotations

import functools

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

from fastserve.runtime.errors import InvalidArgument

# ---------------------------------------------------------------------------------------------------------------
# Architectures: where the attention and MLP layers are


def family_of(model: nn.Module) -> str:
    """gpt2, bert or llama: the stock layout a model (pruned or not) follows."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    found = {"gpt2": "gpt2", PrunedGPT2Config.model_type: "gpt2", "bert": "bert",
             PrunedBertConfig.model_type: "bert", "llama": "llama"}.get(model_type)
    if found is None:
        raise InvalidArgument(f"structured pruning supports GPT-2, BERT and (MLP only) Llama, not {model_type!r}",
                              field="model")
    return found


def blocks(model: nn.Module, family: str) -> list[nn.Module]:
    base = model.base_model
    return list({"gpt2": lambda: base.h, "bert": lambda: base.encoder.layer, "llama": lambda: base.layers}[family]())


def _like(module: nn.Module, new: nn.Module) -> nn.Module:
    """`new` on the device and in the dtype of `module` (meta while from_pretrained builds the model)."""
    return new.to(device=module.weight.device, dtype=module.weight.dtype)


def linear(old: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None,
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


def conv1d(old: Conv1D, in_idx: torch.Tensor | None = None, out_idx: torch.Tensor | None = None,
           nf: int | None = None, nx: int | None = None) -> Conv1D:
    """Conv1D (weight [in, out]) counterpart of `linear`."""
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


def attention(block: nn.Module, family: str) -> nn.Module:
    return block.attn if family == "gpt2" else block.attention


def head_layout(attn: nn.Module, family: str) -> tuple[int, int]:
    """(heads, head_dim) of one attention module as it is now."""
    if family == "gpt2":
        return attn.num_heads, attn.head_dim
    return attn.self.num_attention_heads, attn.self.attention_head_size


def resize_heads(attn: nn.Module, family: str, keep: torch.Tensor | None, count: int) -> None:
    """Keep the heads at `keep` (copying weights) or, with keep=None, rebuild empty at `count` heads."""
    heads, dim = head_layout(attn, family)
    if family == "gpt2":
        device = attn.c_attn.weight.device
        width = heads * dim
        if keep is None:
            attn.c_attn = conv1d(attn.c_attn, nf=3 * count * dim)
            attn.c_proj = conv1d(attn.c_proj, nx=count * dim)
        else:
            features = _head_slices(keep, dim, device)
            qkv = torch.cat([features + part * width for part in range(3)])
            attn.c_attn = conv1d(attn.c_attn, out_idx=qkv)
            attn.c_proj = conv1d(attn.c_proj, in_idx=features)
        attn.num_heads, attn.split_size = count, count * dim
        return
    self_attn, output = attn.self, attn.output
    if keep is None:
        for name in ("query", "key", "value"):
            setattr(self_attn, name, linear(getattr(self_attn, name), out_features=count * dim))
        output.dense = linear(output.dense, in_features=count * dim)
    else:
        features = _head_slices(keep, dim, self_attn.query.weight.device)
        for name in ("query", "key", "value"):
            setattr(self_attn, name, linear(getattr(self_attn, name), rows=features))
        output.dense = linear(output.dense, cols=features)
    self_attn.num_attention_heads, self_attn.all_head_size = count, count * dim


def _apply_head_counts(model: nn.Module) -> None:
    """Build the attention of a pruned model at the sizes its config records (weights are loaded after)."""
    counts = getattr(model.config, "heads_per_layer", None)
    if not counts:
        return
    found = family_of(model)
    for block, count in zip(blocks(model, found), counts, strict=True):
        attn = attention(block, found)
        if head_layout(attn, found)[0] != count:
            resize_heads(attn, found, None, count)


# ---------------------------------------------------------------------------------------------------------------
# The model types


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


MODEL_TYPES = (PrunedGPT2Config.model_type, PrunedBertConfig.model_type)

# stock class -> its head-pruned counterpart (a pruned class maps to itself: pruning again is fine)
PRUNED_CLASSES: dict[type, type] = {
    GPT2Model: PrunedGPT2Model, GPT2LMHeadModel: PrunedGPT2LMHeadModel,
    GPT2ForSequenceClassification: PrunedGPT2ForSequenceClassification,
    BertModel: PrunedBertModel, BertForSequenceClassification: PrunedBertForSequenceClassification,
}
PRUNED_CLASSES |= {cls: cls for cls in list(PRUNED_CLASSES.values())}
PRUNED_CONFIGS = {"gpt2": PrunedGPT2Config, "bert": PrunedBertConfig}


@functools.cache  # once a process: the Auto mappings are global
def register() -> None:
    """Make `AutoConfig` and the `AutoModel*` classes know the pruned model types."""
    for config_class, classes in ((PrunedGPT2Config, (PrunedGPT2Model, PrunedGPT2LMHeadModel,
                                                      PrunedGPT2ForSequenceClassification)),
                                  (PrunedBertConfig, (PrunedBertModel, None, PrunedBertForSequenceClassification))):
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        for auto, cls in zip((AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification), classes,
                             strict=True):
            if cls is not None:
                auto.register(config_class, cls, exist_ok=True)
