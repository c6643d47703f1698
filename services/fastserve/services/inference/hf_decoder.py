"""Any decoder-only transformers LM in the engine, through transformers' attention interface.

The model's own base module runs on the packed row as one batch of one (`position_ids` carries each
token's position in its own sequence), so embeddings, rotary or learned positions, norms and MLPs are
the model's code. Only attention is the engine's: every family in architectures.DECODERS calls
`ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`, and the model is set to "fastserve", a function
registered here that hands q/k/v to the step's `attend` (attention.py), which writes them into the
engine's KV cache and attends over each sequence's own slot. The step's `attend` is held in a context
variable for the duration of one forward pass; outside one (say `generate` on the same model) both
the attention and the mask functions are transformers' sdpa ones, so the model behaves as before.

This is how vLLM's transformers backend runs a model; the per-layer shapes (head-pruned GPT-2 keeps
different head counts per layer) and scales are read by running one token through the model once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from fastserve.runtime.errors import FailedPrecondition
from fastserve.services.inference.decoder import Attend, Cross, Decoder

ATTENTION = "fastserve"

# (attention module, query, key, value [1, H, T, d], scaling, other keyword arguments) -> output [1, T, Hq, d]
_Step = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, float | None, dict[str, Any]], torch.Tensor]
_step: ContextVar[_Step | None] = ContextVar("fastserve_attention_step", default=None)

# Keyword arguments a model may pass its attention function: they change nothing here, or (a sliding
# window) bound the slot length. Any other one (a logit softcap, attention sinks) would change the
# numbers, so a model passing it is refused.
_UNDERSTOOD = frozenset({"position_ids", "output_attentions", "use_cache", "cache_position", "is_causal",
                         "sliding_window"})


def _attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
               **kwargs: Any) -> tuple[torch.Tensor, None]:
    step = _step.get()
    if step is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    return step(module, query, key, value, scaling, kwargs), None


def _mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    # In a step the engine masks by each slot's length (attention.py): the model builds no T x T mask,
    # which over a packed row of many sequences would be wrong as well as large.
    return None if _step.get() is not None else sdpa_mask(*args, **kwargs)


@functools.cache  # once a process: the interfaces are global
def register() -> None:
    AttentionInterface.register(ATTENTION, _attention)
    AttentionMaskInterface.register(ATTENTION, _mask)


class HfDecoder(Decoder):
    """A causal LM of any family in architectures.DECODERS (head-pruned and torchao-quantized ones included)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        register()
        model.set_attn_implementation(ATTENTION)
        if model.config._attn_implementation != ATTENTION:
            raise FailedPrecondition(f"the {self.config.model_type} model cannot switch its attention "
                                     "implementation, so the engine cannot run it", field="model_uri")
        self.base = model.base_model
        self.head = model.get_output_embeddings()
        # Gemma 2 style final-logit softcapping, which generate applies after the head (none of
        # DECODERS has it today; a model that sets it gets it).
        self.softcap = getattr(self.config, "final_logit_softcapping", None)
        self.kv_heads, head_dims, self.scales, windows = self._probe()
        if len(set(head_dims)) != 1:
            raise FailedPrecondition(f"the {self.config.model_type} model's layers differ in head size "
                                     f"({sorted(set(head_dims))}); the KV cache needs one", field="model_uri")
        self.head_dim = head_dims[0]
        positions = getattr(self.config, "max_position_embeddings", None) or 2048
        # A sliding window larger than the slot never binds, so attention over the whole slot is the model's.
        self.max_positions = int(min([positions] + [w for w in windows if w]))

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, attend: Attend, cross: Cross | None = None
                ) -> torch.Tensor:
        def step(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 scaling: float | None, kwargs: dict[str, Any]) -> torch.Tensor:
            q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [T, H, d]
            return attend(module.layer_idx, q, k, v, scale=scaling).view(1, q.shape[0], q.shape[1], q.shape[2])

        return self._run(ids, positions, step)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def _run(self, ids: torch.Tensor, positions: torch.Tensor, step: _Step) -> torch.Tensor:
        token = _step.set(step)
        try:
            out = self.base(input_ids=ids[None], position_ids=positions[None], use_cache=False)
        finally:
            _step.reset(token)
        return out.last_hidden_state[0]

    @torch.inference_mode()
    def _probe(self) -> tuple[list[int], list[int], list[float], list[int | None]]:
        """Per layer (KV heads, head size, scale, sliding window), from one token run through the model;
        refuses a model whose layers do not all attend through the interface, or pass what it ignores."""
        seen: dict[int, tuple[int, int, float, int | None]] = {}
        calls = []

        def step(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 scaling: float | None, kwargs: dict[str, Any]) -> torch.Tensor:
            unknown = sorted(k for k, v in kwargs.items() if v is not None and k not in _UNDERSTOOD)
            if unknown:
                raise FailedPrecondition(f"the {self.config.model_type} model's attention takes {', '.join(unknown)}, "
                                         "which the engine does not implement", field="model_uri")
            layer = getattr(module, "layer_idx", None)
            calls.append(layer)
            seen[layer] = (key.shape[1], key.shape[3], query.shape[3] ** -0.5 if scaling is None else float(scaling),
                           kwargs.get("sliding_window"))
            # One query over one key: the output is the value, repeated over a group's query heads.
            return value.repeat_interleave(query.shape[1] // value.shape[1], dim=1).transpose(1, 2)

        zero = torch.zeros(1, dtype=torch.long, device=self.device)
        self._run(zero, zero, step)
        layers = int(self.config.num_hidden_layers)
        if len(calls) != layers or set(calls) != set(range(layers)):
            raise FailedPrecondition(f"the {self.config.model_type} model's {layers} layers do not each attend "
                                     "through transformers' attention interface, so the engine cannot run it",
                                     field="model_uri")
        kv_heads, head_dims, scales, windows = (list(values) for values in zip(*(seen[i] for i in range(layers)),
                                                                                 strict=True))
        return kv_heads, head_dims, scales, windows
