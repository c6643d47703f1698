"""BERT, RoBERTa, DistilBERT and XLM-R through the encoder backends (encoders.py): tiny random checkpoints of
each, with a tokenizer trained here in the folder, give the embeddings of transformers' own forward pass
plus the same pooling and the classification logits of transformers' head, one text at a time (so padding
in a batch changes nothing), up to the last position their tables hold (RoBERTa's family numbers positions
from padding_idx + 1), and the same again through an ONNX export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import processors
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
    XLMRobertaConfig,
    XLMRobertaForSequenceClassification,
)

from fastserve.corpora.stdlib import stdlib_documents
from fastserve.models.encoders import OnnxBackend, TorchBackend
from fastserve.models.pooling import mean_pool
from fastserve.runtime.errors import InvalidArgument
from fastserve.services.optimization.export import export_classifier_onnx, export_encoder_onnx
from fastserve.services.preprocessing.tokenizer_training import TokenizerSpec, save_tokenizer, train_tokenizer
from tests.support.rpc import field_of

FAMILIES = ("bert", "roberta", "distilbert", "xlm-roberta")
POSITIONS = 64  # RoBERTa's family fits POSITIONS - padding_idx - 1 tokens
LABELS = {0: "negative", 1: "neutral", 2: "positive"}
TEXTS = ["Return the number of items.", "x", "Create a new socket "
         "for the family.", "If the file is closed, raise ValueError."]


def _tokenizer(folder: Path, family: str):
    """WordPiece `[CLS] text [SEP]` for BERT and DistilBERT; byte-level BPE `<s> text </s>` for RoBERTa (pad 1,
    as its checkpoints have it); Unigram `<s> text </s>` for XLM-R (SentencePiece style, pad 0)."""
    texts = [d["text"] for d in stdlib_documents(seed=0, max_documents=120)]
    model = {"bert": "wordpiece", "distilbert": "wordpiece", "roberta": "bpe", "xlm-roberta": "unigram"}[family]
    spec = TokenizerSpec(model, 300, special_tokens=("<s>", "</s>") if model == "bpe" else ())
    tok = train_tokenizer(spec, iter(texts), length=len(texts))
    if model != "wordpiece":
        bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", bos), ("</s>", eos)])
    save_tokenizer(tok, spec, folder)
    return tok


def build_encoder(folder: Path, family: str, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(folder, family)
    torch.manual_seed(seed)
    vocab, pad = tok.get_vocab_size(), tok.token_to_id("[PAD]" if family in ("bert", "distilbert") else "<pad>")
    common = {"vocab_size": vocab, "max_position_embeddings": POSITIONS, "pad_token_id": pad, "id2label": LABELS,
              "label2id": {v: k for k, v in LABELS.items()}, "initializer_range": 0.2}
    if family == "distilbert":
        model = DistilBertForSequenceClassification(DistilBertConfig(dim=32, hidden_dim=64, n_layers=2, n_heads=4,
                                                                     **common))
    else:
        sizes = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
        if family == "bert":
            model = BertForSequenceClassification(BertConfig(type_vocab_size=2, **sizes, **common))
        else:
            cls, config = {"roberta": (RobertaForSequenceClassification, RobertaConfig),
                           "xlm-roberta": (XLMRobertaForSequenceClassification, XLMRobertaConfig)}[family]
            model = cls(config(type_vocab_size=1, bos_token_id=tok.token_to_id("<s>"),
                               eos_token_id=tok.token_to_id("</s>"), **sizes, **common))
    model.eval().save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    return {family: build_encoder(root / family, family) for family in FAMILIES}


def _reference_ids(folder: Path, text: str) -> list[int]:
    """transformers' tokenizer on the folder: the ids a user of transformers would feed."""
    return AutoTokenizer.from_pretrained(str(folder))(text)["input_ids"]


def reference_embedding(folder: Path, text: str) -> np.ndarray:
    model = AutoModel.from_pretrained(str(folder)).eval()
    ids = torch.tensor([_reference_ids(folder, text)])
    with torch.inference_mode():
        hidden = model(input_ids=ids).last_hidden_state.numpy()
    return mean_pool(hidden, np.ones(ids.shape, dtype=np.int64))[0]


def reference_logits(folder: Path, text: str) -> np.ndarray:
    model = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    with torch.inference_mode():
        return model(input_ids=torch.tensor([_reference_ids(folder, text)])).logits[0].numpy()


@pytest.mark.parametrize("family", FAMILIES)
def test_embeddings_equal_transformers_forward_and_pooling(folders, family):
    backend = TorchBackend(folders[family], "embedding")
    encoded = backend.encoder.encode(TEXTS, truncate=False)
    assert [row for row in encoded.ids] == [_reference_ids(folders[family], t) for t in TEXTS]
    got = backend.run(encoded.ids)  # one padded batch
    assert got.shape == (len(TEXTS), backend.dimension) and backend.dimension == 32
    for text, row in zip(TEXTS, got, strict=True):
        np.testing.assert_allclose(row, reference_embedding(folders[family], text), atol=2e-5)
    assert np.ptp(got, axis=0).max() > 1e-2  # the texts really differ


@pytest.mark.parametrize("family", FAMILIES)
def test_classification_logits_equal_transformers(folders, family):
    backend = TorchBackend(folders[family], "sequence_classification")
    assert backend.labels == list(LABELS.values())
    rows = backend.encoder.encode(TEXTS, truncate=False).ids
    ids, mask = backend.encoder.pad(rows)
    logits = backend._forward(ids, mask)
    expected = np.stack([reference_logits(folders[family], t) for t in TEXTS])
    np.testing.assert_allclose(logits, expected, atol=2e-5)
    probabilities = backend.run(rows)
    np.testing.assert_allclose(probabilities, np.exp(expected) / np.exp(expected).sum(-1, keepdims=True), atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_window_is_every_position_the_table_holds_and_no_more(folders, family):
    backend = TorchBackend(folders[family], "embedding")
    offset = family in ("roberta", "xlm-roberta")
    pad = AutoModel.from_pretrained(str(folders[family])).config.pad_token_id
    assert backend.max_length == (POSITIONS - pad - 1 if offset else POSITIONS)
    assert backend.encoder.pad_id == pad
    long_text = " ".join(TEXTS * 6)
    with pytest.raises(InvalidArgument) as refused:
        backend.encoder.encode([TEXTS[0], long_text], truncate=False)
    assert field_of(refused.value) == "texts[1]"
    rows = backend.encoder.encode([long_text, TEXTS[1]], truncate=True).ids
    assert len(rows[0]) == backend.max_length  # the last position of the table is used
    got = backend.run(rows)
    model = AutoModel.from_pretrained(str(folders[family])).eval()
    with torch.inference_mode():
        hidden = model(input_ids=torch.tensor([rows[0]])).last_hidden_state.numpy()
    np.testing.assert_allclose(got[0], mean_pool(hidden, np.ones((1, len(rows[0])), dtype=np.int64))[0], atol=2e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_onnx_exports_serve_the_same_outputs(folders, family, tmp_path):
    torch_embed = TorchBackend(folders[family], "embedding")
    rows = torch_embed.encoder.encode(TEXTS, truncate=False).ids
    export_encoder_onnx(folders[family], tmp_path / "encoder")
    onnx_embed = OnnxBackend(tmp_path / "encoder", "embedding")
    np.testing.assert_allclose(onnx_embed.run(rows), torch_embed.run(rows), atol=1e-4)
    export_classifier_onnx(folders[family], tmp_path / "classifier")
    onnx_classify = OnnxBackend(tmp_path / "classifier", "sequence_classification")
    torch_classify = TorchBackend(folders[family], "sequence_classification")
    np.testing.assert_allclose(onnx_classify.run(rows), torch_classify.run(rows), atol=1e-4)
