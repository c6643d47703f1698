"""The decoders of BART and Marian encoder-decoders, split at attention like decoder.py's T5Decoder.

Both decoders are post-LN stacks of the same layer (self-attention, cross-attention over the encoder
states, fc1/fc2, a layer norm after each residual add) and end in `lm_head` plus `final_logits_bias`.
They differ only in the embeddings: BART learns positions (its table is offset by 2) and normalises
the sum (`layernorm_embedding`), scaling tokens inside its embedding module when `scale_embedding`;
Marian adds fixed sinusoidal positions to tokens scaled by `embed_scale`, with no norm.

transformers scales q.k by head_dim ** -0.5 inside the attention call (`BartAttention.scaling`), not
on the q projection, so q goes to `attend`/`cross` as projected and `scales` carries the factor.
"""

from __future__ import annotations

import torch
from torch import nn

from fastserve.services.inference.decoder import Attend, Cross, Decoder

FAMILIES = ("bart", "marian")


class BartDecoder(Decoder):
    """`BartForConditionalGeneration` or `MarianMTModel`; the runner encodes each source once and caches, per
    layer, the cross-attention keys and values of the encoder states."""

    encoder_decoder = True

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        c = self.config
        self.kind = c.model_type
        self.layers = list(model.model.decoder.layers)
        attns = [layer.self_attn for layer in self.layers]
        self.head_dim = attns[0].head_dim
        self.kv_heads = [a.num_heads for a in attns]
        self.scales = [a.scaling for a in attns]
        self.max_positions = int(c.max_position_embeddings)  # the position table (BART's past its offset)
        self.max_source = int(c.max_position_embeddings)
        # generate takes its start token from the generation config, which a checkpoint may set apart
        generation = getattr(model, "generation_config", None)
        start = getattr(generation, "decoder_start_token_id", None)
        self.start_id = int(c.decoder_start_token_id if start is None else start)

    def encode(self, source: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, cross-attention keys and values [L, H, d] of one source sequence."""
        ids = torch.tensor([source], device=self.device)
        states = self.model.model.encoder(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0]
        shape = (len(source), -1, self.head_dim)
        return [(layer.encoder_attn.k_proj(states).view(shape), layer.encoder_attn.v_proj(states).view(shape))
                for layer in self.layers]

    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        d = self.model.model.decoder
        if self.kind == "marian":
            return d.embed_tokens(ids) * d.embed_scale + d.embed_positions(ids.shape, position_ids=positions)
        # BartScaledWordEmbedding scales itself; the positional table adds its offset of 2
        x = d.embed_tokens(ids) + d.embed_positions(ids[None], position_ids=positions)[0]
        return d.layernorm_embedding(x)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, attend: Attend, cross: Cross | None = None
                ) -> torch.Tensor:
        x = self.embed(ids, positions)
        shape = (len(ids), -1, self.head_dim)
        for i, layer in enumerate(self.layers):
            a = layer.self_attn
            x = layer.self_attn_layer_norm(
                x + a.out_proj(attend(i, a.q_proj(x).view(shape), a.k_proj(x).view(shape), a.v_proj(x).view(shape))))
            e = layer.encoder_attn
            x = layer.encoder_attn_layer_norm(x + e.out_proj(cross(i, e.q_proj(x).view(shape))))
            x = layer.final_layer_norm(x + layer.fc2(layer.activation_fn(layer.fc1(x))))
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return (self.model.lm_head(hidden) + self.model.final_logits_bias).float()
