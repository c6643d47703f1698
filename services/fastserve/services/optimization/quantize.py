"""Quantization: ONNX Runtime dynamic int8 for exported graphs, and torchao for PyTorch models.

ONNX int8 (`quantize_onnx_int8_dynamic`). ONNX Runtime's dynamic quantization gives each MatMul an int8
weight (per output channel) and quantizes its input activations per tensor at run time, with one uint8 scale
for the whole tensor. Transformers break that in two known ways (Dettmers et al. 2022, "LLM.int8()"; Sun et
al. 2024, "Massive activations"):
- a few hidden channels after every LayerNorm are 10-30x larger than the rest (all-MiniLM-L6-v2: channels
  62, 63, 99, 223), so one scale wastes most of the 8 bits on them. SmoothQuant (Xiao et al. 2023, alpha 0.5)
  moves that range into the weights: x @ W == (x / s) @ (s * W), exactly in fp32, with
  s = sqrt(max|x_j| / max|W_j|) per input channel, done as a Mul node after the LayerNorm feeding only the
  MatMuls (the residual path is untouched);
- a few MLP down-projections get token-specific spikes after the activation function that no per-channel
  scale can move. The MatMuls whose input peak is furthest above its 99.9th percentile (>= 8x) stay fp32,
  as long as they hold no more than 6% of the weights.
Both use activation ranges measured on a few built-in sentences run through the fp32 graph, tokenized with
the tokenizer saved next to the model (the exports here put it there); without one the graph is quantized
plainly. Embedding tables (Gather) are quantized too: they are half of a small encoder's bytes.

torchao (`quantize_torch`) swaps nn.Linear weights for torchao tensor subclasses (never torch.ao.quantization).
The quantized folder's format (safetensors with torchao's metadata and a `quantization.json` recipe, no pickle)
is `fastserve.models.quantized`: every service loads such folders, so it is not this service's to define.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper, numpy_helper
from torch import nn

from fastserve.models.quantized import conv1d_to_linear
from fastserve.models.tokenizers import load_transformers_tokenizer
from fastserve.runtime.errors import FailedPrecondition, InvalidArgument
from fastserve.services.optimization.export import (
    EXTERNAL_DATA_BYTES,
    copy_sidecar_files,
    initializer_bytes,
    temporary_dir,
)

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------------------
# ONNX Runtime dynamic int8

SMOOTH_ALPHA = 0.5  # SmoothQuant's migration strength: the range is split evenly between activations and weights
SPIKE_RATIO = 8.0  # activation peak / 99.9th percentile above which a MatMul's input is "spiky"
FP32_BUDGET = 0.06  # at most this share of the weights is left in fp32
NORM_OPS = {"LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
            "SkipSimplifiedLayerNormalization", "RMSNormalization"}
CALIBRATION_TEXTS = [
    "The quarterly report was published on Tuesday morning.",
    "How many kilometres is it from the station to the old harbour?",
    "She fixed the bug by adding a missing null check.",
    "Heavy snowfall closed several mountain passes overnight.",
    "Mix the flour with water and knead the dough for ten minutes.",
    "The orchestra will perform Beethoven's ninth symphony in May.",
    "Interest rates remained unchanged for the third consecutive month.",
    "Our cat refuses to eat anything except tuna.",
]


def _tokenizer_near(model_path: Path) -> Any | None:
    try:
        return load_transformers_tokenizer(model_path.parent)
    except InvalidArgument:  # no tokenizer saved beside the graph: it is quantized without calibration
        return None


def _calibration_feeds(model: onnx.ModelProto, model_path: Path) -> list[dict[str, np.ndarray]]:
    """One feed per calibration sentence (batch 1, no padding), or [] when the graph's inputs are not the
    usual transformer ones or no tokenizer is saved beside it."""
    tokenizer = _tokenizer_near(model_path)
    if tokenizer is None:
        return []
    vocab = _vocab_size(model)
    feeds = []
    for text in CALIBRATION_TEXTS:
        ids = np.asarray([tokenizer(text)["input_ids"]], dtype=np.int64)
        if ids.shape[1] < 2 or (vocab is not None and int(ids.max()) >= vocab):
            return []  # a tokenizer that does not belong to this model (transformers builds empty ones)
        feed: dict[str, np.ndarray] = {}
        for inp in model.graph.input:
            shape = [d.dim_value for d in inp.type.tensor_type.shape.dim]
            if inp.name == "input_ids":
                feed[inp.name] = ids
            elif inp.name == "attention_mask":
                feed[inp.name] = np.ones_like(ids)
            elif inp.name == "token_type_ids":
                feed[inp.name] = np.zeros_like(ids)
            elif inp.name == "position_ids":
                feed[inp.name] = np.arange(ids.shape[1], dtype=np.int64)[None]
            elif inp.name.startswith("past_key_values.") and len(shape) == 4:
                feed[inp.name] = np.zeros((1, shape[1], 0, shape[3]), dtype=np.float32)  # an empty cache
            else:
                return []
        feeds.append(feed)
    return feeds


def _vocab_size(model: onnx.ModelProto) -> int | None:
    """Rows of the embedding table that input_ids index, if the graph has one."""
    shapes = {t.name: t.dims for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Gather" and node.input[1] == "input_ids" and node.input[0] in shapes:
            return int(shapes[node.input[0]][0])
    return None


def _matmul_groups(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """MatMuls with a constant 2-D float weight, grouped by their activation input (q, k and v share one)."""
    weights = {t.name for t in model.graph.initializer if len(t.dims) == 2 and t.data_type == onnx.TensorProto.FLOAT}
    groups: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in weights:
            groups.setdefault(node.input[0], []).append(node)
    return groups


def _activation_stats(path: Path, names: list[str], feeds: list[dict[str, np.ndarray]],
                      tmp: Path) -> dict[str, tuple[np.ndarray, float, float]]:
    """Per tensor: (per-channel max |x|, max |x|, 99.9th percentile of |x|) over the calibration feeds,
    read by exposing the tensors as extra graph outputs of the fp32 model."""
    model = onnx.load(str(path))
    present = {o.name for o in model.graph.output}
    model.graph.output.extend(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                              for n in names if n not in present)
    probe = tmp / "probe.onnx"
    _save(model, probe)
    session = ort.InferenceSession(str(probe), providers=["CPUExecutionProvider"])
    values: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for feed in feeds:
        for name, value in zip(names, session.run(names, feed), strict=True):
            values[name].append(np.abs(value).reshape(-1, value.shape[-1]))
    stats = {}
    for name, parts in values.items():
        flat = np.concatenate(parts)
        stats[name] = (flat.max(0), float(flat.max()), float(np.percentile(flat, 99.9)))
    return stats


def _smooth(model: onnx.ModelProto, groups: dict[str, list[onnx.NodeProto]],
            stats: dict[str, tuple[np.ndarray, float, float]]) -> list[str]:
    """SmoothQuant on the MatMul groups fed by a normalization: insert Mul(x, 1/s) and scale the weights' rows
    by s. Exact in fp32. Returns the smoothed activation names."""
    producers = {out: node for node in model.graph.node for out in node.output}
    inits = {t.name: t for t in model.graph.initializer}
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    smoothed: dict[str, onnx.NodeProto] = {}
    for index, (x, matmuls) in enumerate(groups.items()):
        producer = producers.get(x)
        if producer is None or producer.op_type not in NORM_OPS or producer.output[0] != x:
            continue
        weights = [numpy_helper.to_array(inits[m.input[1]]) for m in matmuls]
        w_max = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        a_max = stats[x][0]
        scale = np.maximum(a_max, 1e-5) ** SMOOTH_ALPHA / np.maximum(w_max, 1e-5) ** (1 - SMOOTH_ALPHA)
        scale = np.clip(scale, 1e-2, 1e2).astype(np.float32)
        for matmul, weight in zip(matmuls, weights, strict=True):
            name = matmul.input[1]
            if uses[name] > 1:  # shared elsewhere: give this MatMul its own copy
                name = f"{name}_smoothed_{index}"
                matmul.input[1] = name
                model.graph.initializer.append(onnx.TensorProto())
                inits[name] = model.graph.initializer[-1]
            inits[name].CopyFrom(numpy_helper.from_array((weight * scale[:, None]).astype(np.float32), name))
        inverse = numpy_helper.from_array((1.0 / scale).astype(np.float32), f"smooth_{index}_inverse_scale")
        model.graph.initializer.append(inverse)
        for matmul in matmuls:
            matmul.input[0] = f"{x}_smoothed"
        smoothed[x] = helper.make_node("Mul", [x, inverse.name], [f"{x}_smoothed"], name=f"smooth_{index}")
    # Each Mul goes right after the normalization that feeds it, which keeps the graph topologically sorted.
    nodes = []
    for node in model.graph.node:
        nodes.append(node)
        if node.output and node.output[0] in smoothed:
            nodes.append(smoothed[node.output[0]])
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return list(smoothed)


def _spiky_matmuls(model: onnx.ModelProto, groups: dict[str, list[onnx.NodeProto]], skip: set[str],
                   stats: dict[str, tuple[np.ndarray, float, float]]) -> list[str]:
    """Names of the MatMuls to keep in fp32: spikiest inputs first, within FP32_BUDGET of the weights."""
    sizes = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
    budget = FP32_BUDGET * sum(sizes.values())
    ranked = sorted(((stats[x][1] / max(stats[x][2], 1e-12), x) for x in groups if x not in skip), reverse=True)
    excluded, spent = [], 0
    for ratio, x in ranked:
        if ratio < SPIKE_RATIO:
            break
        cost = sum(sizes[m.input[1]] for m in groups[x])
        if spent + cost <= budget:
            excluded += [m.name for m in groups[x]]
            spent += cost
    return excluded


def _save(model: onnx.ModelProto, path: Path) -> None:
    if initializer_bytes(model) > EXTERNAL_DATA_BYTES:
        onnx.save_model(model, str(path), save_as_external_data=True, location=path.name + ".data")
    else:
        onnx.save_model(model, str(path))


def _prepare_for_int8(source: Path, tmp: Path) -> tuple[Path, list[str]]:
    """Smooth the LayerNorm outliers and pick the MatMuls to leave in fp32; returns the graph to quantize and
    the node names to exclude."""
    model = onnx.load(str(source))
    # The quantizer turns Gemm(transB=1) into MatMul by transposing the weight in place; a shape recorded
    # for that weight by pre-processing would then contradict it (a classifier head: "384 vs 4").
    inits = {t.name for t in model.graph.initializer}
    kept = [vi for vi in model.graph.value_info if vi.name not in inits]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)
    excluded = _smooth_outliers(model, source, tmp)
    prepared = tmp / "prepared.onnx"
    _save(model, prepared)
    return prepared, excluded


def _smooth_outliers(model: onnx.ModelProto, source: Path, tmp: Path) -> list[str]:
    """Smooth `model` in place where calibration on `source` allows; the MatMuls to keep in fp32."""
    feeds = _calibration_feeds(model, source)
    groups = _matmul_groups(model)
    if not feeds or not groups:
        log.info("int8: no calibration possible for %s (no tokenizer beside it or unusual inputs); "
                 "quantizing without smoothing", source.name)
        return []
    try:
        stats = _activation_stats(source, list(groups), feeds, tmp)
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own Exception subclasses; plain int8 still works
        log.warning("int8: calibration of %s failed (%s); quantizing without smoothing", source.name, exc)
        return []
    smoothed = _smooth(model, groups, stats)
    excluded = _spiky_matmuls(model, groups, set(smoothed), stats)
    log.info("int8: smoothed %d LayerNorm outputs, kept %d MatMuls in fp32: %s", len(smoothed), len(excluded),
             excluded)
    return excluded


def quantize_onnx_int8_dynamic(onnx_in: Path, onnx_out: Path, per_channel: bool = True) -> Path:
    """Dynamic int8 (ONNX Runtime `quantize_dynamic`, int8 weights, uint8 activations quantized at run time)
    of MatMul and Gather (embedding) weights, after ONNX Runtime's pre-processing and the outlier handling in
    the module docstring. For all-MiniLM-L6-v2 this is ~3.4x smaller than fp32 with every sentence embedding
    at cosine >= 0.99 of fp32, and faster on CPU."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    onnx_in, onnx_out = Path(onnx_in), Path(onnx_out)
    if not onnx_in.is_file():
        raise InvalidArgument(f"{onnx_in} is not a file", field="model")
    onnx_out.parent.mkdir(parents=True, exist_ok=True)
    large = onnx_in.stat().st_size > EXTERNAL_DATA_BYTES or any(onnx_in.parent.glob(onnx_in.name + ".data"))
    with temporary_dir(onnx_out) as scratch:
        tmp = Path(scratch)
        pre = tmp / onnx_in.name  # same name and folder layout as the source, so its tokenizer is found
        copy_sidecar_files(onnx_in.parent, tmp)
        # Symbolic shape inference cannot follow the dynamo exporter's shape arithmetic ("Incomplete symbolic
        # shape inference"); ONNX shape inference plus ONNX Runtime's basic optimizations are what matter.
        quant_pre_process(str(onnx_in), str(pre), skip_symbolic_shape=True, save_as_external_data=large)
        prepared, excluded = _prepare_for_int8(pre, tmp)
        # reduce_range: 7-bit weights. Without AVX-512 VNNI, ONNX Runtime's u8s8 kernels add pairs of
        # products in int16 and saturate with full 8-bit weights (measured on an AVX2 EPYC: MiniLM's min
        # cosine to fp32 0.928 against >= 0.99 with 7 bits). A model may be quantized on one CPU and
        # served on another, so the range that is right on every CPU is the one used.
        quantize_dynamic(str(prepared), str(onnx_out), op_types_to_quantize=["MatMul", "Gather"],
                         per_channel=per_channel, reduce_range=True, weight_type=QuantType.QInt8,
                         nodes_to_exclude=excluded, use_external_data_format=large,
                         extra_options={"MatMulConstBOnly": True})
    onnx.checker.check_model(str(onnx_out))
    copy_sidecar_files(onnx_in.parent, onnx_out.parent)
    return onnx_out


# --------------------------------------------------------------------------------------------------------------
# torchao

METHODS = ("int8_dynamic", "int8_weight_only", "int4_weight_only")
DEVICES = ("cpu", "cuda")
INT4_GROUP_SIZE = 128


def _torchao_config(method: str) -> Any:
    from torchao.quantization import Int4WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig
    from torchao.quantization.quantize_.workflows import Int4PackingFormat

    if method == "int8_dynamic":
        return Int8DynamicActivationInt8WeightConfig()
    if method == "int8_weight_only":
        return Int8WeightOnlyConfig()
    # tinygemm's tile-packed layout runs on PyTorch's own CUDA kernel (_weight_int4pack_mm); the default "plain"
    # layout needs fbgemm-gpu-genai, which is not a dependency.
    return Int4WeightOnlyConfig(group_size=INT4_GROUP_SIZE, int4_packing_format=Int4PackingFormat.TILE_PACKED_TO_4D)


def _linear_filter(model: nn.Module, method: str) -> Callable[[nn.Module, str], bool]:
    """Linear layers, except those sharing their weight with an embedding (a tied lm_head: quantizing it would
    untie it) and, for int4, those whose input width is not a multiple of the group size."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}

    def wanted(module: nn.Module, fqn: str) -> bool:
        if not isinstance(module, nn.Linear) or id(module.weight) in embeddings:
            return False
        return method != "int4_weight_only" or module.in_features % INT4_GROUP_SIZE == 0

    return wanted


def quantize_torch(model: nn.Module, method: str, device: str = "cpu") -> nn.Module:
    """Quantize the model's Linear layers in place with torchao and return it (eval mode, on `device`).

    int8_dynamic: int8 weights and per-token int8 activations (CPU or GPU); int8_weight_only: int8 weights,
    float activations; int4_weight_only: int4 groups of 128 with bf16 activations (the model is cast to
    bfloat16), which needs CUDA. GPT-2's Conv1D layers are converted to Linear first."""
    if method not in METHODS:
        raise InvalidArgument(f"method must be one of {', '.join(METHODS)}, not {method!r}", field="method")
    if device not in DEVICES:
        raise InvalidArgument(f"device must be one of {', '.join(DEVICES)}, not {device!r}", field="device")
    if method == "int4_weight_only" and device != "cuda":
        raise FailedPrecondition("int4_weight_only needs a CUDA GPU (torchao's int4 kernels); use int8_dynamic or "
                                 "int8_weight_only on CPU")
    if device == "cuda" and not torch.cuda.is_available():
        raise FailedPrecondition(f"{method} on cuda was asked for, but this machine has no CUDA GPU")
    from torchao.quantization import quantize_

    converted = conv1d_to_linear(model)
    model.eval().to(device)
    if method == "int4_weight_only":
        model.to(torch.bfloat16)  # the int4 kernel takes bf16 weights and activations only
    wanted = _linear_filter(model, method)
    names = [name for name, module in model.named_modules() if wanted(module, name)]
    if not names:
        raise InvalidArgument(f"the model has no Linear layers that {method} can quantize", field="model")
    quantize_(model, _torchao_config(method), filter_fn=wanted, device=device)
    # The recipe `fastserve.models.quantized.save_quantized_torch` records, so the folder loads back alike.
    model._fastserve_quantization = {"method": method, "device": device, "conv1d_converted": converted > 0,
                                     "modules": names}
    return model
