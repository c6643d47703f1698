"""`make demo`: the whole FastServe story against the local stack, over gRPC, in about 5 minutes on 2 cores.

Clean the stdlib docstrings, train a BPE tokenizer, build a causal-LM and a topic dataset, train a
small GPT and fine-tune all-MiniLM-L6-v2 as a classifier of stdlib modules, export the classifier to
ONNX and quantize it (int8), serve both (`stdlib-gpt` for generation, `stdlib-topic` for
classification), then generate, classify and embed, trace the served classifier's lineage in the
registry, and print a summary. The stack stays up afterwards so the models can be tried.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from google.protobuf import struct_pb2

from fastserve.client import FastServeClient
from fastserve.client.jobs import JobClient
from fastserve.common.v1 import jobs_pb2
from fastserve.inference.v1 import inference_pb2 as ipb
from fastserve.inference.v1 import inference_pb2_grpc
from fastserve.optimization.v1 import optimization_pb2 as opb
from fastserve.optimization.v1 import optimization_pb2_grpc
from fastserve.preprocessing.v1 import preprocessing_pb2 as ppb
from fastserve.preprocessing.v1 import preprocessing_pb2_grpc
from fastserve.registry.v1 import registry_pb2 as rpb
from fastserve.registry.v1 import registry_pb2_grpc
from fastserve.runtime.config import Config
from fastserve.runtime.protos import struct
from fastserve.stack.processes import Stack
from fastserve.training.v1 import training_pb2 as tpb
from fastserve.training.v1 import training_pb2_grpc

MINILM = "builtin://all-MiniLM-L6-v2"
SAMPLE_PROMPTS = ["Return the", "Create a new", "This module provides"]
SAMPLE_DOCS = ["Return the absolute path of the file.", "Send an HTTP request and read the response headers.",
               "Parse the email message and return its payload."]


@dataclass(frozen=True)
class DemoPlan:
    """How big each stage is; `quick()` is the shortened run the tests use."""

    documents: int = 4000  # docstrings for the tokenizer and the GPT
    topic_documents: int = 1200  # docstrings of the 4 largest modules, for the classifier
    vocab_size: int = 2000
    gpt_layers: int = 4
    gpt_hidden: int = 192
    gpt_steps: int = 1500
    topic_epochs: int = 2

    @classmethod
    def quick(cls) -> DemoPlan:
        return cls(documents=600, topic_documents=300, vocab_size=500, gpt_layers=2, gpt_hidden=64, gpt_steps=40,
                   topic_epochs=1)


@dataclass
class Summary:
    lines: list[str]

    def add(self, line: str) -> None:
        self.lines.append(line)
        print(f"   {line}", flush=True)


def run_demo(config: Config, plan: DemoPlan = DemoPlan(), keep_running: bool = True) -> dict:
    """Run the pipeline on the local stack (started if needed); the figures it printed, by name."""
    stack = Stack(config)
    print("== bringing the stack up", flush=True)
    stack.up()
    try:
        figures = _pipeline(config, plan)
    finally:
        if not keep_running:
            stack.down()
    if keep_running:
        print("\nThe stack is still running with stdlib-gpt and stdlib-topic served on "
              f"127.0.0.1:{config.port('inference')}. Try (after `source .venv/bin/activate`, or as "
              "`.venv/bin/fastserve`):\n"
              "  fastserve generate 'Return the' --model stdlib-gpt --temperature 0.8 --top-k 40\n"
              "  fastserve classify 'Open the file and read its lines.' --model stdlib-topic\n"
              "Stop it with: make down")
    return figures


def _pipeline(config: Config, plan: DemoPlan) -> dict:
    started = time.monotonic()
    summary, figures = Summary([]), {}
    with FastServeClient.from_settings(config.client_settings()) as fs:
        # The requests are built here in full; the client's channels carry them and follow the jobs.
        pre = preprocessing_pb2_grpc.PreprocessingServiceStub(fs.channel("preprocessing"))
        train = training_pb2_grpc.TrainingServiceStub(fs.channel("training"))
        opt = optimization_pb2_grpc.OptimizationServiceStub(fs.channel("optimization"))
        inf = inference_pb2_grpc.InferenceServiceStub(fs.channel("inference"))
        registry = registry_pb2_grpc.RegistryServiceStub(fs.channel("inference"))

        print("== 1/6 clean the stdlib docstrings", flush=True)
        stdlib = ppb.CorpusSource(builtin=ppb.BuiltinCorpus(name="stdlib-docstrings", seed=0,
                                                             max_documents=plan.documents))
        clean = _wait(fs.preprocessing, pre.SubmitCleanJob(ppb.SubmitCleanJobRequest(
            source=stdlib, output_name="stdlib-clean",
            steps=[ppb.CleanStep(name="nfkc"), ppb.CleanStep(name="collapse_whitespace"),
                   ppb.CleanStep(name="length_filter", options=struct({"min_chars": 40})),
                   ppb.CleanStep(name="dedup_exact")])).job)
        corpus = ppb.CorpusSource(artifact_uri=clean["corpus_uri"])
        summary.add(f"corpus: {int(clean['documents_in'])} docstrings in, {int(clean['documents_out'])} kept")

        print("== 2/6 train a BPE tokenizer; build the datasets", flush=True)
        tok = _wait(fs.preprocessing, pre.TrainTokenizer(ppb.TrainTokenizerRequest(
            source=corpus, model=ppb.TOKENIZER_MODEL_BPE, vocab_size=plan.vocab_size, output_name="stdlib-bpe")).job)
        clm = _wait(fs.preprocessing, pre.BuildDataset(ppb.BuildDatasetRequest(
            source=corpus, tokenizer_uri=tok["tokenizer_uri"], task=ppb.DATASET_TASK_CAUSAL_LM, max_length=64,
            splits=ppb.Splits(validation_fraction=0.05, seed=0), output_name="stdlib-clm")).job)
        topics = _wait(fs.preprocessing, pre.BuildDataset(ppb.BuildDatasetRequest(
            source=ppb.CorpusSource(builtin=ppb.BuiltinCorpus(name="stdlib-docstrings", seed=0, top_labels=4,
                                                              max_documents=plan.topic_documents)),
            tokenizer_uri=MINILM, task=ppb.DATASET_TASK_SEQUENCE_CLASSIFICATION, max_length=64,
            splits=ppb.Splits(validation_fraction=0.2, seed=0), output_name="stdlib-topics")).job)
        balance = {k: int(v) for k, v in topics["class_balance"]["validation"].items()}
        majority = max(balance.values()) / sum(balance.values())
        summary.add(f"tokenizer: BPE, {int(tok['vocab_size'])} tokens; causal-LM dataset: "
                    f"{int(clm['tokens'])} tokens; topics: {', '.join(sorted(balance))}")

        print("== 3/6 train a small GPT", flush=True)
        gpt = _wait(fs.training, train.SubmitTrainingJob(tpb.SubmitTrainingJobRequest(
            model=tpb.ModelSpec(architecture=tpb.ArchitectureConfig(
                family=tpb.ARCHITECTURE_FAMILY_GPT2, num_layers=plan.gpt_layers, hidden_size=plan.gpt_hidden,
                num_heads=4, max_position_embeddings=256)),
            task=tpb.TRAINING_TASK_CAUSAL_LM, dataset_uri=clm["dataset_uri"], output_name="stdlib-gpt",
            hyperparameters=tpb.Hyperparameters(learning_rate=3e-3, batch_size=16, max_steps=plan.gpt_steps,
                                                warmup_steps=min(50, plan.gpt_steps // 4),
                                                log_interval_steps=max(plan.gpt_steps // 10, 1),
                                                eval_interval_steps=plan.gpt_steps, seed=0))).job)
        metrics = dict(gpt["metrics"])
        figures["gpt_loss"], figures["gpt_perplexity"] = metrics["loss"], metrics.get("eval_perplexity", 0.0)
        summary.add(f"stdlib-gpt: {int(gpt['parameters']) / 1e6:.1f}M parameters, {int(gpt['steps'])} steps, "
                    f"final loss {metrics['loss']:.2f}, validation perplexity {figures['gpt_perplexity']:.1f}")

        print("== 4/6 fine-tune all-MiniLM-L6-v2 as a classifier of stdlib modules", flush=True)
        topic = _wait(fs.training, train.SubmitTrainingJob(tpb.SubmitTrainingJobRequest(
            model=tpb.ModelSpec(pretrained_uri=MINILM), task=tpb.TRAINING_TASK_SEQUENCE_CLASSIFICATION,
            dataset_uri=topics["dataset_uri"], output_name="stdlib-topic-fp32",
            hyperparameters=tpb.Hyperparameters(learning_rate=1e-4, batch_size=16, epochs=plan.topic_epochs,
                                                warmup_steps=10, log_interval_steps=10, seed=0))).job)
        figures["accuracy"], figures["majority"] = topic["metrics"]["eval_accuracy"], majority
        summary.add(f"stdlib-topic: accuracy {figures['accuracy']:.1%} against a majority baseline of {majority:.1%}")

        print("== 5/6 export the classifier to ONNX and quantize it (ONNX Runtime int8 dynamic)", flush=True)
        job = _submit_wait(fs.optimization, opt.SubmitOptimizationJob(opb.SubmitOptimizationJobRequest(
            model_uri=topic["model_uri"], target=opb.TARGET_CPU, eval_dataset_uri=topics["dataset_uri"],
            steps=[opb.OptimizationStep(export=opb.ExportStep(format=opb.EXPORT_FORMAT_ONNX)),
                   opb.OptimizationStep(quantize=opb.QuantizeStep(
                       method=opb.QUANTIZATION_METHOD_ONNX_INT8_DYNAMIC))],
            quality_budget=opb.QualityBudget(max_relative_degradation=0.05), output_name="stdlib-topic")).job)
        report = opt.GetReport(opb.GetReportRequest(job_id=job.job_id), timeout=30).report
        b, a = report.before, report.after
        figures["size_before"], figures["size_after"] = b.size_bytes, a.size_bytes
        figures["backend_after"] = a.backend
        summary.add(f"optimization: {b.backend} {b.size_bytes / 1e6:.1f} MB -> {a.backend} int8 "
                    f"{a.size_bytes / 1e6:.1f} MB, batch-1 latency "
                    f"{b.latency_ms_batch1:.1f} -> {a.latency_ms_batch1:.1f} ms, accuracy {b.quality:.1%} -> "
                    f"{a.quality:.1%} ({'promoted' if report.promoted else 'kept out: over the quality budget'})")
        topic_uri = report.result.uri if report.promoted else topic["model_uri"]

        print("== 6/6 serve both and call them", flush=True)
        inf.LoadModel(ipb.LoadModelRequest(name="stdlib-gpt", model_uri=gpt["model_uri"], config=ipb.ModelConfig(
            task=ipb.MODEL_TASK_GENERATION, scheduling=ipb.SCHEDULING_POLICY_MLFQ,
            batching=ipb.BatchingConfig(max_batch_size=16))), timeout=300)
        inf.LoadModel(ipb.LoadModelRequest(name="stdlib-topic", model_uri=topic_uri, config=ipb.ModelConfig(
            task=ipb.MODEL_TASK_SEQUENCE_CLASSIFICATION,
            backend=ipb.BACKEND_ONNXRUNTIME if report.promoted else ipb.BACKEND_PYTORCH,
            batching=ipb.BatchingConfig(enabled=True))), timeout=300)
        figures["samples"] = []
        figures["sample_tokens"] = []
        for seed, prompt in enumerate(SAMPLE_PROMPTS):
            reply = inf.Generate(ipb.GenerateRequest(model="stdlib-gpt", text=prompt, sampling=ipb.SamplingParams(
                max_new_tokens=24, temperature=0.8, top_k=40, seed=seed)), timeout=60)
            figures["samples"].append(prompt + reply.text)
            figures["sample_tokens"].append(reply.usage.completion_tokens)
            summary.add(f"generate: {(prompt + reply.text).splitlines()[0][:100]!r}")
        labels = inf.Classify(ipb.ClassifyRequest(model="stdlib-topic", texts=SAMPLE_DOCS), timeout=60).results
        figures["labels"] = [r.label for r in labels]
        for doc, result in zip(SAMPLE_DOCS, labels, strict=True):
            summary.add(f"classify: {doc!r} -> {result.label} ({result.scores[0].score:.2f})")
        embedding = inf.Embed(ipb.EmbedRequest(model="all-MiniLM-L6-v2", texts=[SAMPLE_DOCS[0]]), timeout=60)
        figures["embedding_dim"] = embedding.dimension
        summary.add(f"embed: all-MiniLM-L6-v2 gives {embedding.dimension} dimensions")
        # The registry traces the served classifier back to the text it was made from.
        shown = registry.GetArtifact(rpb.GetArtifactRequest(uri=topic_uri), timeout=30)
        figures["lineage"] = [(e.uri, e.relation, e.input_uri) for e in shown.lineage]
        summary.add(f"lineage of {topic_uri}: " + "; ".join(
            f"{e.uri.removeprefix('artifact://')} <-{e.relation}- {e.input_uri.removeprefix('artifact://')}"
            for e in shown.lineage))

    minutes = (time.monotonic() - started) / 60
    print(f"\n== summary ({minutes:.1f} min)")
    for line in summary.lines:
        print(f"   {line}")
    return figures


def _submit_wait(jobs: JobClient, job: jobs_pb2.Job) -> jobs_pb2.Job:
    """Follow a job to its end, printing its loss now and then; the final job, or RuntimeError if it did not
    succeed."""
    last = 0.0

    def show_loss(event: jobs_pb2.JobEvent) -> None:
        nonlocal last
        data = dict(event.data)
        if "loss" in data and time.monotonic() - last > 5:
            print(f"   step {int(data.get('step', 0))}: loss {data['loss']:.3f}", flush=True)
            last = time.monotonic()

    final = jobs.wait_job(job.job_id, on_event=show_loss)
    if final.state != jobs_pb2.JOB_STATE_SUCCEEDED:
        raise RuntimeError(f"job {job.job_id} ended {jobs_pb2.JobState.Name(final.state)}: {final.error}")
    return final


def _wait(jobs: JobClient, job: jobs_pb2.Job) -> struct_pb2.Struct:
    return _submit_wait(jobs, job).result
