"""Decoder models split at attention, so the model runner can run attention against its own KV cache.

A `Decoder` runs a transformers causal LM (GPT-2 or Llama family, head-pruned and torchao-quantized
ones included) or the decoder of an encoder-decoder (T5) on a packed row of tokens from many
sequences at once: the runner passes each token's position and an `attend(layer, q, k, v)` callback
that stores k/v in the cache and returns the attention output (and for T5 a `cross(layer, q)` callback
over the encoder states it cached). Everything except attention calls the model's own modules, so the
numbers are the model's numbers and greedy decoding matches transformers' `generate`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fastserve.runtime.errors import FailedPrecondition

# attend(layer index, q [T, Hq, d], k [T, Hkv, d], v [T, Hkv, d]) -> attention output [T, Hq * d]
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# cross(layer index, q [T, H, d]) -> attention output over the sequence's encoder states [T, H * d]
Cross = Callable[[int, torch.Tensor], torch.Tensor]

FAMILIES = ("gpt2", "fastserve_gpt2_pruned", "llama", "t5")


class Decoder:
    """Per-layer shapes (heads may differ by layer after pruning) and the packed forward pass."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config
        self.device = next(model.parameters()).device
        self.dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        self.vocab_size = int(self.config.vocab_size)

    kv_heads: list[int]  # per layer (head-pruned layers differ)
    head_dim: int
    max_positions: int
    scales: list[float]
    encoder_decoder = False
    start_id: int | None = None  # the decoder's first token, for encoder-decoders

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, attend: Attend, cross: Cross | None = None
                ) -> torch.Tensor:
        """Hidden states [T, hidden] of the final norm for packed tokens `ids` [T] at `positions` [T]."""
        raise NotImplementedError

    def position_bias(self, query_positions: torch.Tensor, keys: int) -> torch.Tensor | None:
        """Additive attention bias [n, heads, keys] for queries at `query_positions`, if the model has one."""
        return None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden).float()


class Gpt2Decoder(Decoder):
    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.blocks = list(model.transformer.h)
        attns = [b.attn for b in self.blocks]
        self.kv_heads = [a.num_heads for a in attns]
        self.head_dim = attns[0].head_dim
        self.max_positions = int(self.config.n_positions)
        self.scales = [(a.head_dim ** -0.5 if a.scale_attn_weights else 1.0) /
                       (i + 1 if a.scale_attn_by_inverse_layer_idx else 1) for i, a in enumerate(attns)]

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, attend: Attend, cross: Cross | None = None
                ) -> torch.Tensor:
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
        self.kv_heads = [c.num_key_value_heads] * len(self.blocks)
        self.max_positions = int(c.max_position_embeddings)
        self.scales = [self.head_dim ** -0.5] * len(self.blocks)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, attend: Attend, cross: Cross | None = None
                ) -> torch.Tensor:
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


class T5Decoder(Decoder):
    """The decoder of a T5 encoder-decoder; the runner encodes each source once and caches, per layer,
    the cross-attention keys and values of the encoder states."""

    encoder_decoder = True

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        c = self.config
        self.blocks = list(model.decoder.block)
        self.head_dim = c.d_kv
        self.kv_heads = [c.num_heads] * len(self.blocks)
        self.max_positions = 512  # relative positions set no window; this bounds the KV slots
        self.max_source = int(getattr(c, "n_positions", 512) or 512)
        self.scales = [1.0] * len(self.blocks)  # T5 does not scale q.k
        self.start_id = int(c.decoder_start_token_id)
        self.bias = self.blocks[0].layer[0].SelfAttention
        self.scale_output = getattr(c, "scale_decoder_outputs", c.tie_word_embeddings)

    def encode(self, source: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, cross-attention keys and values [L, H, d] of one source sequence."""
        states = self.model.encoder(input_ids=torch.tensor([source], device=self.device)).last_hidden_state[0]
        shape = (len(source), -1, self.head_dim)
        return [(b.layer[1].EncDecAttention.k(states).view(shape), b.layer[1].EncDecAttention.v(states).view(shape))
                for b in self.blocks]

    def position_bias(self, query_positions: torch.Tensor, keys: int) -> torch.Tensor:
        a = self.bias
        relative = torch.arange(keys, device=self.device)[None, :] - query_positions[:, None]
        bucket = a._relative_position_bucket(relative, bidirectional=False,
                                             num_buckets=a.relative_attention_num_buckets,
                                             max_distance=a.relative_attention_max_distance)
        return a.relative_attention_bias(bucket).permute(0, 2, 1)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, attend: Attend, cross: Cross | None = None
                ) -> torch.Tensor:
        d = self.model.decoder
        x = d.embed_tokens(ids)
        shape = (len(ids), -1, self.head_dim)
        for i, block in enumerate(self.blocks):
            own, other, ff = block.layer
            a, h = own.SelfAttention, own.layer_norm(x)
            x = x + a.o(attend(i, a.q(h).view(shape), a.k(h).view(shape), a.v(h).view(shape)))
            e = other.EncDecAttention
            x = x + e.o(cross(i, e.q(other.layer_norm(x)).view(shape)))
            x = ff(x)
        x = d.final_layer_norm(x)
        return x * self.config.d_model ** -0.5 if self.scale_output else x


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def open_decoder(model: nn.Module) -> Decoder:
    kind = model.config.model_type
    if kind in ("gpt2", "fastserve_gpt2_pruned"):
        return Gpt2Decoder(model)
    if kind == "llama":
        return LlamaDecoder(model)
    if kind == "t5":
        return T5Decoder(model)
    raise FailedPrecondition(f"generation serves the {', '.join(FAMILIES)} families, not {kind!r}")
