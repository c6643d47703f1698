"""Every decoder-only family in architectures.DECODERS runs in the engine through transformers' attention
interface (hf_decoder.py), and greedy output equals transformers' `generate` for each: tiny random models
(GQA where the family has it), several prompts of different lengths at once, so packing, chunked prefill
and batched decoding all run. Head-pruned (per-layer head counts) and torchao-quantized GPT-2 too."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from fastserve.models import quantized
from fastserve.models.architectures import DECODERS
from fastserve.models.kinds import DECODER
from fastserve.models.loading import load_model
from fastserve.models.pruned import PrunedGPT2Config, PrunedGPT2LMHeadModel, register
from fastserve.runtime.errors import FailedPrecondition
from fastserve.services.inference.decoder import open_decoder
from fastserve.services.inference.engine import Engine
from fastserve.services.inference.generation_settings import GenerationSettings
from fastserve.services.inference.generator import Generator
from fastserve.services.inference.hf_decoder import HfDecoder
from fastserve.services.inference.sampling_params import SamplingParams
from fastserve.services.optimization import quantize
from tests.support.tiny_models import DECODER_TYPES, build_decoder

TEXTS = ["x", "Return the number of", "This module provides access to some objects used or maintained by the "
         "interpreter and to functions that interact strongly with the interpreter.", "If the file"]
NEW_TOKENS = 24
# Prefill budget below the longest prompt, so it prefills in chunks while the others decode.
SETTINGS = GenerationSettings(max_batch_size=4, max_prefill_tokens=12)


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
    return build_decoder(tmp_path_factory.mktemp("arch") / "tokenizer", "gpt2")


def test_every_supported_decoder_has_a_tiny_model_here():
    assert set(DECODER_TYPES) == set(DECODERS)


def generated(engine: Engine, prompts: list[list[int]], n: int = NEW_TOKENS) -> list[list[int]]:
    seqs = [engine.submit(p, SamplingParams(max_new_tokens=n)) for p in prompts]
    for seq in seqs:
        assert seq.done.wait(60)
    engine.drain()
    return [seq.generated for seq in seqs]


def reference(model, prompt: list[int], n: int = NEW_TOKENS) -> list[int]:
    ids = torch.tensor([prompt])
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                          eos_token_id=None)[0, len(prompt):].tolist()


def assert_parity(model, engine: Engine, prompts: list[list[int]]) -> None:
    outputs = generated(engine, prompts)
    for prompt, output in zip(prompts, outputs, strict=True):
        assert output == reference(model, prompt)
    assert len({t for output in outputs for t in output}) > 10  # varied output: a strong comparison


@pytest.mark.parametrize("model_type", DECODER_TYPES)
def test_greedy_decoding_equals_transformers_generate(tmp_path, tokenizer_folder, model_type):
    folder = build_decoder(tmp_path / model_type, model_type, seed=DECODER_TYPES.index(model_type),
                           tokenizer_from=tokenizer_folder)
    generator = Generator(model_type, folder, "fp32", SETTINGS)
    prompts = [generator.tokenizer.encode(text).ids for text in TEXTS]
    assert len(prompts[2]) > SETTINGS.max_prefill_tokens
    stock = AutoModelForCausalLM.from_pretrained(str(folder)).eval()  # transformers' own sdpa attention
    assert_parity(stock, generator.engine, prompts)
    # The engine's model, outside an engine step, still attends as transformers does.
    engine_model = generator.engine.runner.decoder.model
    assert engine_model.config._attn_implementation == "fastserve"
    assert reference(engine_model, prompts[1]) == reference(stock, prompts[1])


def test_gqa_shapes_come_from_the_modules(tmp_path, tokenizer_folder):
    folder = build_decoder(tmp_path / "qwen3", "qwen3", tokenizer_from=tokenizer_folder)
    decoder = open_decoder(AutoModelForCausalLM.from_pretrained(str(folder)).eval())
    assert isinstance(decoder, HfDecoder)
    assert decoder.kv_heads == [2, 2] and decoder.head_dim == 16 and decoder.scales == [0.25, 0.25]


def test_head_pruned_gpt2_with_heads_differing_by_layer(tmp_path, tokenizer_folder):
    register()
    source = AutoModelForCausalLM.from_pretrained(str(build_decoder(tmp_path / "gpt2", "gpt2",
                                                                    tokenizer_from=tokenizer_folder)))
    config = PrunedGPT2Config(**source.config.to_dict() | {"heads_per_layer": [3, 1]})
    torch.manual_seed(3)
    PrunedGPT2LMHeadModel(config).save_pretrained(str(tmp_path / "pruned"))
    model = load_model(tmp_path / "pruned", DECODER)
    decoder = open_decoder(model)
    assert decoder.kv_heads == [3, 1] and decoder.head_dim == 16
    prompts = [[5, 9], list(range(40, 70)), [7] * 5]
    assert_parity(AutoModelForCausalLM.from_pretrained(str(tmp_path / "pruned")).eval(),
                  Engine("pruned", decoder, SETTINGS, set(), lambda ids: ""), prompts)


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_torchao_quantized_decoders(tmp_path, tokenizer_folder, model_type):
    folder = build_decoder(tmp_path / model_type, model_type, tokenizer_from=tokenizer_folder)
    model = quantize.quantize_torch(AutoModelForCausalLM.from_pretrained(str(folder)).eval(), "int8_weight_only")
    quantized.save_quantized_torch(model, tmp_path / "q")
    for path in folder.glob("tokenizer*"):
        (tmp_path / "q" / path.name).write_bytes(path.read_bytes())
    generator = Generator("quantized", tmp_path / "q", "fp32", SETTINGS)
    assert_parity(model, generator.engine, [[5, 9], list(range(40, 70)), [7] * 5])


def test_an_unsupported_architecture_is_refused_naming_the_supported_ones():
    config = AutoConfig.for_model("bloom", vocab_size=64, hidden_size=32, n_layer=1, n_head=4)
    with pytest.raises(FailedPrecondition) as caught:
        open_decoder(AutoModelForCausalLM.from_config(config))
    assert "'bloom'" in str(caught.value) and all(name in str(caught.value) for name in DECODERS)


def test_a_sliding_window_bounds_the_slot_so_it_never_binds():
    config = AutoConfig.for_model("mistral", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=48,
                                  max_position_embeddings=256)
    decoder = open_decoder(AutoModelForCausalLM.from_config(config).eval())
    assert decoder.max_positions == 48
    assert Engine("window", decoder, SETTINGS, set(), lambda ids: "").context == 48


def test_attention_arguments_the_engine_does_not_implement_are_refused():
    # Gemma 2 softcaps attention logits inside its attention call: run anyway, its numbers would differ.
    config = AutoConfig.for_model("gemma2", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    with pytest.raises(FailedPrecondition, match="softcap"):
        HfDecoder(AutoModelForCausalLM.from_config(config).eval())
