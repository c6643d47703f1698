"""Decoder models split at attention, so the model runner can run attention against its own KV cache.

A `Decoder` runs a causal LM (any family in architectures.DECODERS, head-pruned and torchao-quantized
ones included: hf_decoder.py) or the decoder of an encoder-decoder (T5, here) on a packed row of tokens
from many sequences at once: the runner passes each token's position and an `attend(layer, q, k, v)`
callback that stores k/v in the cache and returns the attention output (and for T5 a `cross(layer, q)`
callback over the encoder states it cached). Everything except attention calls the model's own modules,
so the numbers are the model's numbers and greedy decoding matches transformers' `generate`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from fastserve.models.architectures import DECODERS, INTERNAL, SEQ2SEQ
from fastserve.runtime.errors import FailedPrecondition


class Attend(Protocol):
    """attend(layer index, q [T, Hq, d], k [T, Hkv, d], v [T, Hkv, d]) -> attention output [T, Hq * d];
    `scale` multiplies q.k (None: the decoder's `scales[layer]`)."""

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 scale: float | None = None) -> torch.Tensor: ...


# cross(layer index, q [T, H, d]) -> attention output over the sequence's encoder states [T, H * d]
Cross = Callable[[int, torch.Tensor], torch.Tensor]


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
    scales: list[float]  # per layer, what q.k is multiplied by
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


def open_decoder(model: nn.Module) -> Decoder:
    from fastserve.services.inference.hf_decoder import HfDecoder  # here: it subclasses Decoder

    kind = model.config.model_type
    if kind in DECODERS or kind in INTERNAL:
        return HfDecoder(model)
    if kind == "t5":
        return T5Decoder(model)
    if kind in ("bart", "marian"):
        from fastserve.services.inference.bart_decoder import BartDecoder  # it imports this module

        return BartDecoder(model)
    raise FailedPrecondition(f"generation runs the decoders {', '.join(DECODERS)} and the encoder-decoders "
                             f"{', '.join(SEQ2SEQ)}, not {kind!r}", field="model_uri")
