"""The optimization core: a pipeline of steps (prune, export, quantize) over a registered model, and a
before/after report. No gRPC here.

Each step reads the previous step's folder and writes a new one; the last becomes a new model version
only if its quality stays within the user's budget (or the user forces it). The report always is
published, and says what was measured: size on disk and parameters, latency at batch 1 and throughput
at batch 32 through the encoder backends inference serves with (`fastserve.models.encoders`: PyTorch or
ONNX Runtime), and quality on held-out data (embedding cosine similarity to the source for encoders,
accuracy for classifiers, perplexity for causal LMs).

What a folder is (its kind, how it loads, pruned or quantized) is `fastserve.models`; this module only
decides what to do with it.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastserve.models.encoders import OnnxBackend, TorchBackend
from fastserve.models.kinds import CLASSIFIER, DECODER, ENCODER, SEQ2SEQ, model_kind
from fastserve.models.loading import load_model
from fastserve.models.quantized import save_quantized_torch
from fastserve.models.refs import resolve_dir
from fastserve.runtime import job_queue
from fastserve.runtime.errors import FailedPrecondition, InvalidArgument, NotFound
from fastserve.runtime.jobs import Job
from fastserve.runtime.stores import Stores
from fastserve.services.optimization import export, measure, prune, quantize
from fastserve.storage.artifacts import check_name
from fastserve.storage.datasets import DatasetReader

SERVICE = "optimization"
JOB_TYPE = "optimization.pipeline"
PRUNE_METHODS = ("magnitude_unstructured", "structured_heads", "structured_channels")
QUANT_METHODS = ("int8_dynamic", "int8_weight_only", "int4_weight_only", "onnx_int8_dynamic")
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
              "sentence_bert_config.json", "generation_config.json")
BATCHED = 32
PARITY_TEXTS = ["FastServe exports models to ONNX.", "A second, somewhat longer sentence checks padding too."]
DEFAULT_BUDGET = 0.02  # relative quality loss accepted when the request sets none
MAX_STEPS = 16
# torch.onnx's dynamo exporter starts at opset 18 and its TorchScript fallback (export.py) stops at 20.
OPSET_RANGE = (18, 20)


def check_steps(steps: list[dict[str, Any]], target: str) -> None:
    """Refuse a pipeline that cannot run, naming the step field; ONNX steps follow an export."""
    if not steps:
        raise InvalidArgument("at least one step is required", field="steps")
    if len(steps) > MAX_STEPS:
        raise InvalidArgument(f"at most {MAX_STEPS} steps, got {len(steps)}", field="steps")
    onnx = False
    for i, step in enumerate(steps):
        field = f"steps[{i}]"
        if step.get("type") == "prune":
            if onnx:
                raise InvalidArgument("pruning works on PyTorch models; prune before exporting", field=field)
            if step.get("method") not in PRUNE_METHODS:
                raise InvalidArgument("method must be MAGNITUDE_UNSTRUCTURED, STRUCTURED_HEADS or STRUCTURED_CHANNELS",
                                      field=f"{field}.prune.method")
            sparsity = step.get("sparsity", 0.0)
            if not 0.0 <= sparsity < 1.0:
                raise InvalidArgument(f"sparsity must be in [0, 1), got {sparsity}", field=f"{field}.prune.sparsity")
        elif step.get("type") == "export":
            if onnx:
                raise InvalidArgument("the model is already ONNX", field=field)
            if step.get("precision") not in ("fp32", "fp16"):
                raise InvalidArgument("ONNX export supports fp32 and fp16 weights", field=f"{field}.export.precision")
            opset = step.get("opset") or OPSET_RANGE[0]
            if not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
                raise InvalidArgument(f"opset must be in [{OPSET_RANGE[0]}, {OPSET_RANGE[1]}] (0 = {OPSET_RANGE[0]}), "
                                      f"got {opset}", field=f"{field}.export.opset")
            onnx = True
        elif step.get("type") == "quantize":
            method = step.get("method")
            if method not in QUANT_METHODS:
                raise InvalidArgument("choose a quantization method", field=f"{field}.quantize.method")
            if (method == "onnx_int8_dynamic") != onnx:
                raise InvalidArgument("ONNX_INT8_DYNAMIC needs an ONNX model (export first); the torchao methods "
                                      "need a PyTorch model (quantize before exporting)",
                                      field=f"{field}.quantize.method")
            if method == "int4_weight_only" and target != "gpu":
                raise InvalidArgument("int4 weight-only quantization runs on GPUs; set target TARGET_GPU",
                                      field=f"{field}.quantize.method")
        else:
            raise InvalidArgument("each step is one of prune, export, quantize", field=field)


def step_label(step: dict[str, Any]) -> str:
    """A step as a client spells it (`quantize:onnx_int8_dynamic`, `prune:structured_heads,sparsity=0.5`), so
    that progress names the step as the request did."""
    if step["type"] == "prune":
        return f"prune:{step['method']},sparsity={step['sparsity']:g}"
    if step["type"] == "export":
        options = ["optimize_graph=true"] if step.get("optimize_graph") else []
        if step.get("precision", "fp32") != "fp32":
            options.append(f"precision={step['precision']}")
        return ",".join(["export:onnx", *options])
    return f"quantize:{step['method']}"


@dataclass
class Stage:
    folder: Path
    onnx: bool
    parity: float | None = None  # after an export: max |PyTorch - ONNX Runtime| on sample inputs


def _copy_side_files(source: Path, target: Path) -> None:
    for name in SIDE_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, target / name)


Publish = Callable[[], dict[str, Any]]


class Optimization:
    def __init__(self, stores: Stores) -> None:
        self.stores = stores

    def prepare(self, params: dict[str, Any]) -> tuple[Path, str]:
        check_name(params.get("output_name", ""), "output_name")
        source = resolve_dir(self.stores.artifacts, params.get("model_uri", ""), "model_uri", ("models",))
        kind = model_kind(source)
        if (source / "model.onnx").is_file():
            raise InvalidArgument("the source must be a PyTorch model", field="model_uri")
        if kind == SEQ2SEQ:  # no exporter, pruning layout or quality metric for encoder-decoders here
            raise InvalidArgument("optimization takes encoders, classifiers and causal LMs; this model is an "
                                  "encoder-decoder", field="model_uri")
        check_steps(params.get("steps", []), params.get("target", "cpu"))
        budget = params.get("max_relative_degradation", 0.0)
        if not 0 <= budget <= 1:  # NaN fails too
            raise InvalidArgument("max_relative_degradation must be in [0, 1]",
                                  field="quality_budget.max_relative_degradation")
        if kind != ENCODER and params.get("eval_dataset_uri"):
            self._eval_rows(params["eval_dataset_uri"], kind)
        return source, kind

    def submit(self, params: dict[str, Any], request_id: str = "") -> Job:
        self.prepare(params)
        return job_queue.submit(self.stores, SERVICE, JOB_TYPE, params, request_id)

    # -- running -------------------------------------------------------------------------------

    def run(self, params: dict[str, Any], job_id: str, progress: Callable[[float, str], None],
            log: Callable[[str], None] = lambda message: None,
            once: Callable[[Publish], dict[str, Any]] = lambda publish: publish()) -> dict[str, Any]:
        """Run the job's steps, measure before and after, and publish through `once` (a job's
        `publish_once`, so that a redelivered job does not publish twice)."""
        source, kind = self.prepare(params)
        steps = params["steps"]
        work = self.stores.artifacts.scratch("optimize-")
        try:
            stage, parity = Stage(source, onnx=False), None
            for i, step in enumerate(steps):
                label = f"step {i + 1}/{len(steps)} {step_label(step)}"
                progress(i / (len(steps) + 2), label)
                started = time.perf_counter()
                stage = self._apply(step, stage, kind, work / f"step{i}", params.get("target", "cpu"))
                log(f"{label}: done in {time.perf_counter() - started:.1f} s")
                parity = stage.parity if stage.parity is not None else parity
            progress(len(steps) / (len(steps) + 2), "measuring")
            evaluation = self._evaluation(params, kind)
            before = self._measure(Stage(source, onnx=False), kind, evaluation, reference=None)
            after = self._measure(stage, kind, evaluation, reference=evaluation.get("reference"))
            degradation = _degradation(before, after)
            within = degradation <= (params.get("max_relative_degradation") or DEFAULT_BUDGET)
            promoted = within or bool(params.get("force_promote"))
            progress((len(steps) + 1) / (len(steps) + 2), "publishing")
            report = {"job_id": job_id, "source_model_uri": params["model_uri"], "steps": steps, "before": before,
                      "after": after, "relative_degradation": degradation, "within_budget": within,
                      "promoted": promoted, "result_uri": "", "export_parity_max_abs_diff": parity}
            return once(lambda: self._publish(params, job_id, stage, report))
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _publish(self, params: dict[str, Any], job_id: str, stage: Stage, report: dict[str, Any]) -> dict[str, Any]:
        if report["promoted"]:
            with self.stores.artifacts.publish("models", params["output_name"]) as draft:
                for item in stage.folder.iterdir():
                    if item.is_file():
                        shutil.copy(item, draft.path / item.name)
                draft.metadata["optimization"] = {k: v for k, v in report.items() if k != "result_uri"}
            report["result_uri"] = draft.ref.uri
        with self.stores.artifacts.publish("reports", f"optimization-{job_id}", version=1) as draft:
            (draft.path / "report.json").write_text(json.dumps(report, indent=2))
            draft.metadata["report"] = report
        return report

    def report(self, job_id: str) -> dict[str, Any]:
        try:
            artifact = self.stores.artifacts.resolve(f"artifact://reports/optimization-{job_id}/1")
        except NotFound:
            raise FailedPrecondition(f"job {job_id} has no report: it has not succeeded") from None
        return artifact.manifest["metadata"]["report"]

    def _apply(self, step: dict[str, Any], stage: Stage, kind: str, out: Path, target: str) -> Stage:
        out.mkdir(parents=True)
        if step["type"] == "prune":
            model = load_model(stage.folder, kind)
            sparsity = step["sparsity"]
            if step["method"] == "magnitude_unstructured":
                prune.magnitude_prune(model, sparsity)
            elif step["method"] == "structured_heads":
                prune.prune_heads(model, sparsity)
            else:
                prune.prune_mlp_channels(model, sparsity)
            model.save_pretrained(str(out))
            _copy_side_files(stage.folder, out)
            return Stage(out, onnx=False)
        if step["type"] == "export":
            exporter = {ENCODER: export.export_encoder_onnx, CLASSIFIER: export.export_classifier_onnx,
                        DECODER: export.export_decoder_onnx}[kind]
            path = exporter(stage.folder, out, step.get("opset") or 18)
            if step.get("optimize_graph"):
                export.optimize_onnx_graph(path, path)
            if step.get("precision") == "fp16":
                export.convert_onnx_fp16(path, path)
            return Stage(out, onnx=True, parity=export.parity(stage.folder, path, kind, PARITY_TEXTS))
        if step["method"] == "onnx_int8_dynamic":
            for item in stage.folder.iterdir():
                if item.is_file() and item.suffix != ".onnx":
                    shutil.copy(item, out / item.name)
            quantize.quantize_onnx_int8_dynamic(stage.folder / "model.onnx", out / "model.onnx")
            return Stage(out, onnx=True)
        device = "cuda" if target == "gpu" and torch.cuda.is_available() else "cpu"
        if step["method"] == "int4_weight_only" and device != "cuda":
            raise FailedPrecondition("int4 weight-only quantization needs a GPU worker")
        model = load_model(stage.folder, kind)
        save_quantized_torch(quantize.quantize_torch(model, step["method"], device), out)
        _copy_side_files(stage.folder, out)
        return Stage(out, onnx=False)

    # -- measuring -----------------------------------------------------------------------------

    def _eval_rows(self, uri: str, kind: str) -> dict[str, np.ndarray]:
        artifact = self.stores.artifacts.resolve(uri, "eval_dataset_uri")
        if artifact.ref.kind != "datasets":
            raise InvalidArgument(f"{uri} is not a dataset", field="eval_dataset_uri")
        reader = DatasetReader(artifact.path, artifact.manifest["metadata"])
        wanted = "causal_lm" if kind == DECODER else "sequence_classification"
        if reader.task != wanted:
            raise InvalidArgument(f"a {kind} is evaluated on a {wanted} dataset", field="eval_dataset_uri")
        split = "validation" if reader.rows("validation") else "train"
        return {k: v[:256] for k, v in reader.arrays(split).items()}

    def _evaluation(self, params: dict[str, Any], kind: str) -> dict[str, Any]:
        if kind == ENCODER:
            from fastserve.corpora.stdlib import stdlib_documents

            return {"texts": [d["text"][:400] for d in stdlib_documents(seed=99, max_documents=256)]}
        if params.get("eval_dataset_uri"):
            return {"rows": self._eval_rows(params["eval_dataset_uri"], kind)}
        return {}

    def _measure(self, stage: Stage, kind: str, evaluation: dict[str, Any],
                 reference: np.ndarray | None) -> dict[str, Any]:
        size = measure.size_on_disk(stage.folder)
        if kind == DECODER:
            return self._measure_decoder(stage, size, evaluation)
        task = "embedding" if kind == ENCODER else "sequence_classification"
        # The PyTorch backend loads whatever the folder holds: plain, head-pruned or torchao-quantized.
        backend = OnnxBackend(stage.folder, task) if stage.onnx else TorchBackend(stage.folder, task)
        texts = evaluation.get("texts") or ["a sentence to time the model with"] * 64
        rows = [backend.encoder.encode([t], truncate=True).ids[0] for t in texts]
        latency = measure.latency(lambda: backend.run(rows[:1]), runs=20, warmup=3)["p50_ms"]
        backend.run(rows[:BATCHED])  # warm-up at the batched size
        batched = min(len(rows), 256)
        start = time.perf_counter()
        outputs = np.concatenate([backend.run(rows[i:i + BATCHED]) for i in range(0, batched, BATCHED)])
        throughput = batched / (time.perf_counter() - start)
        result = {"size_bytes": size, "parameters": _parameters(stage), "latency_ms_batch1": latency,
                  "throughput_batched": throughput, "batched_size": BATCHED, "backend": backend.platform}
        if kind == ENCODER:
            if reference is None:
                evaluation["reference"] = outputs
                result.update(quality=1.0, quality_metric="min_cosine_to_source")
            else:
                result.update(quality=measure.min_cosine(reference, outputs), quality_metric="min_cosine_to_source")
        elif "rows" in evaluation:
            data = evaluation["rows"]
            ids = [list(r[:n]) for r, n in zip(data["input_ids"], data["lengths"], strict=True)]
            predictions = np.concatenate([backend.run(ids[i:i + BATCHED]).argmax(1)
                                          for i in range(0, len(ids), BATCHED)])
            result.update(quality=float((predictions == data["labels"]).mean()), quality_metric="accuracy")
        return result

    def _measure_decoder(self, stage: Stage, size: int, evaluation: dict[str, Any]) -> dict[str, Any]:
        blocks = evaluation.get("rows", {}).get("input_ids")
        if blocks is None:
            blocks = np.random.default_rng(0).integers(0, 100, size=(32, 64))
        blocks = np.asarray(blocks, dtype=np.int64)
        if stage.onnx:
            session = export._cpu_session(stage.folder / "model.onnx")

            def logits(ids: torch.Tensor) -> torch.Tensor:
                out, _ = export.decoder_step(session, ids.numpy(), export.empty_past(session, ids.shape[0]), 0)
                return torch.from_numpy(out)
            forward, parameters, backend = logits, _parameters(stage), "onnxruntime"
        else:
            model = load_model(stage.folder, DECODER)
            forward, parameters, backend = model, measure.count_parameters(model), "pytorch"
        one = torch.from_numpy(blocks[:1])
        batch = torch.from_numpy(blocks[:8])
        with torch.inference_mode():
            latency = measure.latency(lambda: _call(forward, one), runs=10, warmup=2)["p50_ms"]
            batched = measure.latency(lambda: _call(forward, batch), runs=5, warmup=1)["p50_ms"]
        quality = measure.perplexity(forward, blocks) if "rows" in evaluation else 0.0
        return {"size_bytes": size, "parameters": parameters, "latency_ms_batch1": latency,
                "throughput_batched": len(batch) * blocks.shape[1] / (batched / 1e3), "batched_size": len(batch),
                "backend": backend, "quality": quality, "quality_metric": "perplexity" if "rows" in evaluation else ""}


def _call(forward, ids: torch.Tensor) -> Any:
    return forward(ids) if not isinstance(forward, torch.nn.Module) else forward(input_ids=ids)


def _parameters(stage: Stage) -> int:
    if stage.onnx:
        import onnx

        model = onnx.load(str(stage.folder / "model.onnx"), load_external_data=False)
        return int(sum(int(np.prod(t.dims)) for t in model.graph.initializer))
    from safetensors import safe_open

    total = 0
    for path in stage.folder.glob("*.safetensors"):
        with safe_open(str(path), "np") as f:
            for key in f.keys():
                total += int(np.prod(f.get_slice(key).get_shape()))
    return total


def _degradation(before: dict[str, Any], after: dict[str, Any]) -> float:
    """How much worse the quality got, as a fraction (negative: it got better)."""
    metric, b, a = after.get("quality_metric"), before.get("quality", 0.0), after.get("quality", 0.0)
    if metric == "perplexity":
        return (a - b) / b if b else 0.0
    return (b - a) / b if b else 0.0
