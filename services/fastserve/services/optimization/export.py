"""Exporting transformers models to ONNX, checking the result against PyTorch, and graph-level rewrites
(ONNX Runtime graph optimization, fp16 weights).

Every export writes `out_dir/model.onnx` next to a copy of the tokenizer and config files, so the folder is
self-contained for the inference service. Exports use the dynamo exporter (`torch.export` underneath); the
TorchScript exporter is only a logged fallback. Nothing here knows of jobs or gRPC.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir
import onnxruntime as ort
import torch
import transformers
from onnx_ir.passes.common import TopologicalSortPass
from torch import nn
from transformers import DynamicCache, PreTrainedModel

from fastserve.models.kinds import CLASSIFIER, DECODER, ENCODER
from fastserve.models.loading import load_model
from fastserve.models.tokenizers import load_transformers_tokenizer
from fastserve.runtime.errors import FailedPrecondition, InvalidArgument

log = logging.getLogger(__name__)
transformers.utils.logging.disable_progress_bar()  # workers log lines, not progress bars

KINDS = (ENCODER, CLASSIFIER, DECODER)  # the model kinds with an exporter here (not seq2seq)
CPU = ["CPUExecutionProvider"]
# Files that make a model folder usable without its weights: tokenizer, configs, chat templates.
SIDECAR_SUFFIXES = {".json", ".txt", ".model", ".tiktoken", ".jinja"}
# Weights above this go to an external data file: a protobuf cannot exceed 2 GiB.
EXTERNAL_DATA_BYTES = 1_800_000_000


def copy_sidecar_files(src_dir: Path, dst_dir: Path) -> list[str]:
    """Copy tokenizer/config files (not weights) so `dst_dir` can be served on its own."""
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    dst_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    if src_dir.resolve() == dst_dir.resolve():
        return copied
    for path in sorted(src_dir.iterdir()):
        if path.is_file() and path.suffix in SIDECAR_SUFFIXES:
            shutil.copy2(path, dst_dir / path.name)
            copied.append(path.name)
    return copied


def _cpu_session(path: Path, options: ort.SessionOptions | None = None) -> ort.InferenceSession:
    """A session pinned to the CPU provider, so results do not depend on whether a GPU is present."""
    session = ort.InferenceSession(str(path), options or ort.SessionOptions(), providers=CPU)
    if session.get_providers()[0] != "CPUExecutionProvider":
        raise FailedPrecondition(f"ONNX Runtime did not give a CPU session: {session.get_providers()}")
    return session


def _load(kind: str, model_dir: Path) -> PreTrainedModel:
    # fp32 whatever was saved: the graph is exported in fp32 and converted to fp16 afterwards if asked
    return load_model(model_dir, kind, dtype=torch.float32, field="model")


def _weight_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _export(module: nn.Module, args: tuple, path: Path, input_names: list[str], output_names: list[str],
            dynamic_shapes: tuple, dynamic_axes: dict[str, dict[int, str]], opset: int) -> None:
    """torch.onnx.export with dynamo; if torch.export cannot trace the model, the TorchScript exporter."""
    external = _weight_bytes(module) > EXTERNAL_DATA_BYTES
    module.eval()
    with warnings.catch_warnings():
        # The exporter warns about axis renaming and deprecated pytree helpers on every call: noise.
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        try:
            torch.onnx.export(module, args, str(path), input_names=input_names, output_names=output_names,
                              dynamic_shapes=dynamic_shapes, opset_version=opset, dynamo=True,
                              external_data=external, verbose=False)
            return
        except Exception as exc:  # noqa: BLE001 - any exporter failure means: try the other exporter
            log.warning("dynamo ONNX export of %s failed (%s: %s); falling back to dynamo=False",
                        type(module).__name__, type(exc).__name__, str(exc).splitlines()[0][:300])
        path.unlink(missing_ok=True)
        torch.onnx.export(module, args, str(path), input_names=input_names, output_names=output_names,
                          dynamic_axes=dynamic_axes, opset_version=opset, dynamo=False)


def _check(path: Path) -> None:
    # The path form handles external data and models over 2 GiB.
    onnx.checker.check_model(str(path), full_check=False)


class _EncoderWrapper(nn.Module):
    """Plain tensors in, one named tensor out: what the exporter needs."""

    def __init__(self, model: PreTrainedModel, output: str) -> None:
        super().__init__()
        self.model = model
        self.output = output

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return getattr(self.model(input_ids=input_ids, attention_mask=attention_mask), self.output)


def _export_encoder_like(model_dir: Path, out_dir: Path, opset: int, kind: str, output: str) -> Path:
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = _load(kind, model_dir)
    # Batch 2 and length 8: sizes 0 and 1 would be specialised into the graph by torch.export.
    ids = torch.randint(1, max(2, model.config.vocab_size), (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    path = out_dir / "model.onnx"
    _export(_EncoderWrapper(model, output), (ids, mask), path, ["input_ids", "attention_mask"], [output],
            dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}),
            dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
                          output: {0: "batch", 1: "sequence"} if output == "last_hidden_state" else {0: "batch"}},
            opset=opset)
    _check(path)
    copy_sidecar_files(model_dir, out_dir)
    return path


def export_encoder_onnx(model_dir: Path, out_dir: Path, opset: int = 18) -> Path:
    """Export an encoder (AutoModel, BERT-style) to out_dir/model.onnx: inputs input_ids and attention_mask
    (int64, dynamic batch and sequence), output last_hidden_state; tokenizer and config files are copied."""
    return _export_encoder_like(model_dir, out_dir, opset, ENCODER, "last_hidden_state")


def export_classifier_onnx(model_dir: Path, out_dir: Path, opset: int = 18) -> Path:
    """Like `export_encoder_onnx` for AutoModelForSequenceClassification; the output is `logits`."""
    return _export_encoder_like(model_dir, out_dir, opset, CLASSIFIER, "logits")


def past_names(num_layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    return [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


class _DecoderWithCache(nn.Module):
    """A causal LM with its KV cache as flat tensors: (ids, mask, positions, k0, v0, k1, ...) in,
    (logits, present k0, v0, ...) out. The DynamicCache is built and unpacked inside, so the exported graph
    has plain tensor inputs and outputs whatever cache classes transformers uses."""

    def __init__(self, model: PreTrainedModel, num_layers: int) -> None:
        super().__init__()
        self.model = model
        self.num_layers = num_layers

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                past: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)],
                             config=self.model.config)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
        flat: list[torch.Tensor] = [out.logits]
        for layer in out.past_key_values.layers:
            flat += [layer.keys, layer.values]
        return tuple(flat)


def _cache_shapes(model: PreTrainedModel) -> list[tuple[int, int]]:
    """(kv heads, head dim) per layer, read from a real forward pass: correct for GQA and pruned heads alike."""
    with torch.inference_mode():
        out = model(input_ids=torch.zeros(1, 2, dtype=torch.long), use_cache=True)
    return [(layer.keys.shape[1], layer.keys.shape[3]) for layer in out.past_key_values.layers]


def export_decoder_onnx(model_dir: Path, out_dir: Path, opset: int = 18) -> Path:
    """Export a causal LM with the KV cache as explicit inputs and outputs.

    Inputs: input_ids [batch, sequence], attention_mask [batch, past + sequence], position_ids
    [batch, sequence], past_key_values.{i}.key/.value [batch, kv_heads, past, head_dim] (past may be 0).
    Outputs: logits [batch, sequence, vocab] and present.{i}.key/.value [batch, kv_heads, past + sequence,
    head_dim]. One graph serves both the prefill (empty past) and every decode step."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = _load(DECODER, model_dir)
    shapes = _cache_shapes(model)
    layers = len(shapes)
    batch, seq, past_len = 2, 3, 4
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=gen)
    mask = torch.ones(batch, past_len + seq, dtype=torch.long)
    positions = torch.arange(past_len, past_len + seq).expand(batch, seq).contiguous()
    past = tuple(torch.randn(batch, heads, past_len, dim, generator=gen) for heads, dim in shapes for _ in range(2))
    b, s, p = torch.export.Dim("batch"), torch.export.Dim("sequence"), torch.export.Dim("past_sequence")
    # The mask's length is past + sequence: left to torch.export to relate (a named Dim would assert it is free).
    total = torch.export.Dim.DYNAMIC
    dynamic_shapes = ({0: b, 1: s}, {0: b, 1: total}, {0: b, 1: s}, tuple({0: b, 2: p} for _ in past))
    pasts, presents = past_names(layers), present_names(layers)
    dynamic_axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total_sequence"},
                    "position_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}}
    dynamic_axes |= {name: {0: "batch", 2: "past_sequence"} for name in pasts}
    dynamic_axes |= {name: {0: "batch", 2: "total_sequence"} for name in presents}
    path = out_dir / "model.onnx"
    _export(_DecoderWithCache(model, layers), (ids, mask, positions, past), path,
            ["input_ids", "attention_mask", "position_ids", *pasts], ["logits", *presents],
            dynamic_shapes=dynamic_shapes, dynamic_axes=dynamic_axes, opset=opset)
    _name_mask_length(path)
    _check(path)
    copy_sidecar_files(model_dir, out_dir)
    return path


def _name_mask_length(path: Path) -> None:
    """torch.export names the mask's length after an internal symbol (`s53`): call it total_sequence, wherever
    the graph mentions it, so the declared shapes read as documented."""
    model = onnx.load(str(path), load_external_data=False)
    old = model.graph.input[1].type.tensor_type.shape.dim[1].dim_param
    if not old or old == "total_sequence":
        return
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == old:
                dim.dim_param = "total_sequence"
    onnx.save_model(model, str(path))  # external data, if any, stays where it is: its references are unchanged


def empty_past(session: ort.InferenceSession, batch: int) -> dict[str, np.ndarray]:
    """Zero-length past tensors for a prefill, shaped from the session's declared inputs."""
    feed = {}
    for inp in session.get_inputs():
        if inp.name.startswith("past_key_values."):
            _, heads, _, dim = inp.shape
            feed[inp.name] = np.zeros((batch, heads, 0, dim), dtype=np.float32)
    return feed


def decoder_step(session: ort.InferenceSession, input_ids: np.ndarray, past: dict[str, np.ndarray],
                 past_len: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One forward of an exported decoder (no padding): logits and the next step's past."""
    batch, seq = input_ids.shape
    feed = {"input_ids": input_ids.astype(np.int64),
            "attention_mask": np.ones((batch, past_len + seq), dtype=np.int64),
            "position_ids": np.tile(np.arange(past_len, past_len + seq, dtype=np.int64), (batch, 1)), **past}
    names = [o.name for o in session.get_outputs()]
    outs = dict(zip(names, session.run(names, feed), strict=True))
    next_past = {name.replace("present.", "past_key_values."): value
                 for name, value in outs.items() if name.startswith("present.")}
    return outs["logits"], next_past


def greedy_generate_onnx(session: ort.InferenceSession, input_ids: np.ndarray, max_new_tokens: int) -> np.ndarray:
    """Greedy decoding with the KV cache fed back as past: the new tokens, [batch, max_new_tokens]."""
    ids = np.asarray(input_ids, dtype=np.int64)
    logits, past = decoder_step(session, ids, empty_past(session, ids.shape[0]), 0)
    length, new = ids.shape[1], []
    for _ in range(max_new_tokens):
        token = logits[:, -1].argmax(-1).astype(np.int64)[:, None]
        new.append(token)
        logits, past = decoder_step(session, token, past, length)
        length += 1
    return np.concatenate(new, axis=1)


def _as_ids(texts_or_ids: Any, tokenizer_dir: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, mask) batches: texts are tokenized with the model's tokenizer (padded), id arrays used as is."""
    if isinstance(texts_or_ids, str):
        texts_or_ids = [texts_or_ids]
    if isinstance(texts_or_ids, Sequence) and texts_or_ids and all(isinstance(t, str) for t in texts_or_ids):
        tokenizer = load_transformers_tokenizer(tokenizer_dir, field="model")
        if tokenizer.pad_token is None:  # decoders: one text a batch, no padding needed
            encoded = [np.asarray(tokenizer([t])["input_ids"], dtype=np.int64) for t in texts_or_ids]
            return [(ids, np.ones_like(ids)) for ids in encoded]
        enc = tokenizer(list(texts_or_ids), padding=True, return_tensors="np")
        return [(enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64))]
    ids = np.asarray(texts_or_ids.numpy() if isinstance(texts_or_ids, torch.Tensor) else texts_or_ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise InvalidArgument("parity inputs must be texts or a [batch, sequence] integer array", field="inputs")
    ids = ids.astype(np.int64)
    return [(ids, np.ones_like(ids))]


def _decoder_parity(model: PreTrainedModel, session: ort.InferenceSession, ids: np.ndarray) -> float:
    """Prefill with an empty past, then one decode step feeding the presents back; max diff of every output."""
    worst = 0.0
    with torch.inference_mode():
        out = model(input_ids=torch.from_numpy(ids), use_cache=True)
        logits, past = decoder_step(session, ids, empty_past(session, ids.shape[0]), 0)
        worst = max(worst, _max_diff(out.logits, logits))
        for i, layer in enumerate(out.past_key_values.layers):
            worst = max(worst, _max_diff(layer.keys, past[f"past_key_values.{i}.key"]),
                        _max_diff(layer.values, past[f"past_key_values.{i}.value"]))
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        step = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
        logits, past = decoder_step(session, token.numpy(), past, ids.shape[1])
        worst = max(worst, _max_diff(step.logits, logits))
        for i, layer in enumerate(step.past_key_values.layers):
            worst = max(worst, _max_diff(layer.keys, past[f"past_key_values.{i}.key"]),
                        _max_diff(layer.values, past[f"past_key_values.{i}.value"]))
    return worst


def _max_diff(reference: torch.Tensor, value: np.ndarray) -> float:
    return float(np.abs(reference.float().numpy() - value).max())


def parity(model_dir: Path, onnx_path: Path, kind: str, texts_or_ids: Any) -> float:
    """Max absolute difference between PyTorch and ONNX Runtime (CPU provider) outputs on the given inputs.

    kind: "encoder" (last_hidden_state), "classifier" (logits) or "decoder" (logits and presents, for a
    prefill with an empty past and one decode step that feeds the presents back)."""
    if kind not in KINDS:
        raise InvalidArgument(f"kind must be one of {', '.join(KINDS)}, not {kind!r}", field="kind")
    model_dir = Path(model_dir)
    model = _load(kind, model_dir)
    session = _cpu_session(Path(onnx_path))
    worst = 0.0
    for ids, mask in _as_ids(texts_or_ids, model_dir):
        if kind == "decoder":
            worst = max(worst, _decoder_parity(model, session, ids))
            continue
        with torch.inference_mode():
            out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
        reference = out.last_hidden_state if kind == "encoder" else out.logits
        (value,) = session.run([session.get_outputs()[0].name], {"input_ids": ids, "attention_mask": mask})
        worst = max(worst, _max_diff(reference, value))
    return worst


def _random_feed(session: ort.InferenceSession, batch: int = 2, seq: int = 7) -> dict[str, np.ndarray]:
    """Inputs to compare two graphs of the same model on: valid ids, a full mask, an empty past."""
    rng = np.random.default_rng(0)
    feed = empty_past(session, batch)
    for inp in session.get_inputs():
        if inp.name == "input_ids":
            feed[inp.name] = rng.integers(0, 10, (batch, seq), dtype=np.int64)  # ids every vocabulary has
        elif inp.name in ("attention_mask", "token_type_ids"):
            feed[inp.name] = (np.ones if inp.name == "attention_mask" else np.zeros)((batch, seq), dtype=np.int64)
        elif inp.name == "position_ids":
            feed[inp.name] = np.tile(np.arange(seq, dtype=np.int64), (batch, 1))
        elif inp.name not in feed:
            raise InvalidArgument(f"cannot build a test input for graph input {inp.name!r}", field="model")
    return feed


def optimize_onnx_graph(onnx_in: Path, onnx_out: Path) -> Path:
    """ONNX Runtime's extended graph optimizations (fusions, constant folding) for the CPU provider, saved to
    onnx_out. The optimized graph may use com.microsoft ops: it is for ONNX Runtime only. The result is
    loaded and compared with the input graph before it is returned."""
    onnx_in, onnx_out = Path(onnx_in), Path(onnx_out)
    onnx_out.parent.mkdir(parents=True, exist_ok=True)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(onnx_out)
    _cpu_session(onnx_in, options)  # creating the session writes the optimized model
    before, after = _cpu_session(onnx_in), _cpu_session(onnx_out)
    feed = _random_feed(before)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(before.run(None, feed), after.run(None, feed), strict=True))
    if diff > 1e-3:
        raise FailedPrecondition(f"the optimized graph differs from the original by {diff:.2e}")
    copy_sidecar_files(onnx_in.parent, onnx_out.parent)
    return onnx_out


def convert_onnx_fp16(onnx_in: Path, onnx_out: Path) -> Path:
    """fp16 weights and compute, graph inputs/outputs kept as in the source (float32 tensors stay float32).

    Uses ONNX Runtime's bundled converter (`onnxruntime.transformers.float16`, the onnxconverter-common code),
    which keeps numerically fragile ops on its block list in fp32 and inserts the Cast nodes. fp16 is meant for
    GPU providers: the CPU provider lacks fp16 kernels for some ops and may refuse or be slow."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    onnx_in, onnx_out = Path(onnx_in), Path(onnx_out)
    onnx_out.parent.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(onnx_in))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "values truncated to fp16 range": expected, clamped
        half = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=False)
    # The converter appends the Casts of float inputs (a decoder's past) at the end: restore topological order.
    ir_model = onnx_ir.from_proto(half)
    TopologicalSortPass()(ir_model)
    half = onnx_ir.to_proto(ir_model)
    if initializer_bytes(half) > EXTERNAL_DATA_BYTES:
        onnx.save_model(half, str(onnx_out), save_as_external_data=True, location=onnx_out.name + ".data")
    else:
        onnx.save_model(half, str(onnx_out))
    _check(onnx_out)
    copy_sidecar_files(onnx_in.parent, onnx_out.parent)
    return onnx_out


def initializer_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the weights held in the protobuf (external data not loaded counts as 0)."""
    return sum(len(t.raw_data) for t in model.graph.initializer)


def temporary_dir(near: Path) -> tempfile.TemporaryDirectory:
    """A scratch folder beside `near` (same filesystem: large intermediates are moved, not copied)."""
    return tempfile.TemporaryDirectory(dir=Path(near).parent, prefix=".tmp-")
