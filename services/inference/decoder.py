"""Decoder models split at attention, so the generation engine can run attention against its own KV cache.

A `Decoder` runs a transformers causal LM (GPT-2 or Llama family, head-pruned and torchao-quantized
ones included) on a packed row of tokens from many sequences at once: the engine passes each token's
position and an `attend(layer, q, k, v)` callback that stores k/v in the cache and returns the
attention output. Everything except attention calls the model's own modules, so the numbers are the
model's numbers and greedy decoding matches transformers' `generate`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from shared.errors import FailedPrecondition

# attend(layer index, q [T, Hq, d], k [T, Hkv, d], v [T, Hkv, d]) -> attention output [T, Hq * d]
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

CAUSAL_FAMILIES = ("gpt2", "fastserve_gpt2_pruned", "llama")


class Decoder:
    """Per-layer shapes (heads may differ by layer after pruning) and the packed forward pass."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config
        self.device = next(model.parameters()).device
        self.dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        self.vocab_size = int(self.config.vocab_size)

    kv_heads: list[int]
    q_heads: list[int]
    head_dim: int
    max_positions: int
    scales: list[float]

    @property
    def layers(self) -> int:
        return len(self.kv_heads)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, attend: Attend) -> torch.Tensor:
        """Hidden states [T, hidden] of the final norm for packed tokens `ids` [T] at `positions` [T]."""
        raise NotImplementedError

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden).float()


class Gpt2Decoder(Decoder):
    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.blocks = list(model.transformer.h)
        attns = [b.attn for b in self.blocks]
        self.q_heads = [a.num_heads for a in attns]
        self.kv_heads = list(self.q_heads)
        self.head_dim = attns[0].head_dim
        self.max_positions = int(self.config.n_positions)
        self.scales = [(a.head_dim ** -0.5 if a.scale_attn_weights else 1.0) /
                       (i + 1 if a.scale_attn_by_inverse_layer_idx else 1) for i, a in enumerate(attns)]

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, attend: Attend) -> torch.Tensor:
        t = self.model.transformer
        x = t.wte(ids) + t.wpe(positions)
        for i, block in enumerate(self.blocks):
            attn = block.attn
            q, k, v = attn.c_attn(block.ln_1(x)).split(attn.split_size, dim=-1)
            shape = (len(ids), attn.num_heads, attn.head_dim)
            x = x + attn.c_proj(attend(i, q.view(shape), k.view(shape), v.view(shape)))
            x = x + block.mlp(block.ln_2(x))
        return t.ln_f(x)


class LlamaDecoder(Decoder):
    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.blocks = list(model.model.layers)
        c = self.config
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.q_heads = [c.num_attention_heads] * len(self.blocks)
        self.kv_heads = [c.num_key_value_heads] * len(self.blocks)
        self.max_positions = int(c.max_position_embeddings)
        self.scales = [self.head_dim ** -0.5] * len(self.blocks)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, attend: Attend) -> torch.Tensor:
        m = self.model.model
        x = m.embed_tokens(ids)
        cos, sin = m.rotary_emb(x[None], positions[None])
        cos, sin = cos[0, :, None, :], sin[0, :, None, :]  # [T, 1, d]: broadcast over heads
        for i, block in enumerate(self.blocks):
            a, h = block.self_attn, block.input_layernorm(x)
            q = a.q_proj(h).view(len(ids), -1, self.head_dim)
            k = a.k_proj(h).view(len(ids), -1, self.head_dim)
            v = a.v_proj(h).view(len(ids), -1, self.head_dim)
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
            x = x + a.o_proj(attend(i, q, k, v))
            x = x + block.mlp(block.post_attention_layernorm(x))
        return m.norm(x)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def model_type(folder: Path) -> str:
    return json.loads((folder / "config.json").read_text()).get("model_type", "")


def open_decoder(model: nn.Module) -> Decoder:
    kind = model.config.model_type
    if kind in ("gpt2", "fastserve_gpt2_pruned"):
        return Gpt2Decoder(model)
    if kind == "llama":
        return LlamaDecoder(model)
    raise FailedPrecondition(f"generation serves the {', '.join(CAUSAL_FAMILIES)} families, not {kind!r}")
