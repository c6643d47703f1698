"""The training loop in process: resuming from a checkpoint continues exactly where it stopped, the
data order depends only on seed and position, and the memory estimate refuses oversized models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastserve.runtime.config import Config
from fastserve.runtime.errors import FailedPrecondition, InvalidArgument
from fastserve.runtime.stores import Stores
from fastserve.services.preprocessing.core import Preprocessing
from fastserve.services.training.core import Training
from fastserve.services.training.data import Position, Sampler
from fastserve.services.training.spec import TrainingSpec
from fastserve.services.training.trainer import Stopped
from fastserve.storage.datasets import DatasetReader
from tests.support.rpc import field_of


class Recorder:
    def __init__(self, core=None, job="job", stop_at=None):
        self.core, self.job, self.stop_at, self.reports, self.step = core, job, stop_at, [], 0

    def report(self, step, total, metrics):
        self.step = step
        self.reports.append(metrics)

    def should_stop(self):
        return self.stop_at is not None and self.step >= self.stop_at

    def checkpoint(self, step, write):
        return self.core.publish_checkpoint(self.job, step, write)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    stores = Stores.from_config(Config.from_env({"FASTSERVE_HOME": str(tmp_path_factory.mktemp("t") / "home")}))
    source = {"builtin": {"name": "stdlib-docstrings", "max_documents": 600}}
    pre = Preprocessing(stores)
    tok = pre.run_train_tokenizer({"source": source, "model": "bpe", "vocab_size": 400, "output_name": "t"})
    ds = pre.run_build_dataset({"source": source, "tokenizer_uri": tok["tokenizer_uri"], "task": "causal_lm",
                                "max_length": 32, "splits": {"validation_fraction": 0.1}, "output_name": "d"})
    return stores, ds["dataset_uri"]


def params(dataset_uri, **hyper):
    return {"model": {"architecture": {"family": "llama", "num_layers": 1, "hidden_size": 32, "num_heads": 2,
                                       "dropout": 0.0}},
            "task": "causal_lm", "dataset_uri": dataset_uri, "output_name": "m",
            "hyperparameters": {"learning_rate": 1e-2, "batch_size": 4, "max_steps": 20, "log_interval_steps": 5,
                                "checkpoint_interval_steps": 1000, "lr_schedule": "cosine", "warmup_steps": 3,
                                "gradient_accumulation_steps": 2, "max_grad_norm": 1.0, "seed": 4, **hyper}}


def test_stop_then_resume_equals_an_uninterrupted_run(setup):
    stores, uri = setup
    core = Training(stores)
    straight_model, straight = core.train(core.prepare(params(uri)), "straight", Recorder(core, "straight"))
    with pytest.raises(Stopped) as stopped:
        core.train(core.prepare(params(uri)), "interrupted", Recorder(core, "interrupted", stop_at=10))
    assert stopped.value.checkpoint == "artifact://checkpoints/interrupted/10"
    resumed_model, resumed = core.train(core.prepare(params(uri)), "interrupted", Recorder(core, "interrupted"))
    assert resumed.metrics["resumed_from_step"] == 10 and resumed.steps == 20
    for (name, a), (_, b) in zip(straight_model.state_dict().items(), resumed_model.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert resumed.metrics["loss"] == pytest.approx(straight.metrics["loss"], rel=1e-5)


def test_a_job_started_from_another_jobs_checkpoint_equals_an_uninterrupted_run(setup):
    stores, uri = setup
    core = Training(stores)
    straight_model, _ = core.train(core.prepare(params(uri)), "whole", Recorder(core, "whole"))
    with pytest.raises(Stopped):
        core.train(core.prepare(params(uri)), "first", Recorder(core, "first", stop_at=10))
    resumed = {**params(uri), "resume_checkpoint": "artifact://checkpoints/first/10"}
    recorder = Recorder(core, "second")
    model, outcome = core.train(core.prepare(resumed), "second", recorder)
    assert outcome.metrics["resumed_from_step"] == 10 and outcome.steps == 20
    assert [r["step"] for r in recorder.reports if "loss" in r] == [15, 20]
    for (name, a), (_, b) in zip(straight_model.state_dict().items(), model.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    # A limit the checkpoint already reached trains no further; the model is the checkpoint's.
    reached = {**resumed, "hyperparameters": {**resumed["hyperparameters"], "max_steps": 5}}
    recorder = Recorder(core, "third")
    _, outcome = core.train(core.prepare(reached), "third", recorder)
    assert outcome.steps == 10 and recorder.reports == []
    gone = {**resumed, "resume_checkpoint": "artifact://checkpoints/first/9"}
    with pytest.raises(FailedPrecondition, match="checkpoints/first/9"):
        core.train(core.prepare(gone), "fourth", Recorder(core, "fourth"))


def test_sampler_order_depends_only_on_seed_and_position():
    a, b = Sampler(100, 8, seed=1), Sampler(100, 8, seed=1)
    position = Position()
    for _ in range(30):
        position = a.advance(position)
    assert position == Position(epoch=2, batch=6)  # 12 batches an epoch
    assert (a.rows_at(position) == b.rows_at(Position(2, 6))).all()
    halves = [Sampler(100, 4, seed=1, rank=r, world=2).rows_at(Position(1, 3)) for r in (0, 1)]
    assert (np.concatenate(halves) == a.rows_at(Position(1, 3))).all()


def test_requests_are_checked(setup):
    stores, uri = setup
    core = Training(stores)
    with pytest.raises(InvalidArgument) as info:
        TrainingSpec.parse(params(uri, lr_schedule="sawtooth")).check()
    assert field_of(info.value) == "hyperparameters.lr_schedule"
    big = params(uri)
    big["model"]["architecture"].update(hidden_size=4096, num_layers=64, num_heads=32)
    with pytest.raises(FailedPrecondition):
        core.prepare(big)
    narrow = params(uri)
    narrow["model"]["architecture"]["max_position_embeddings"] = 16
    with pytest.raises(InvalidArgument) as info:
        core.prepare(narrow)
    assert field_of(info.value) == "model.architecture.max_position_embeddings"


@pytest.fixture(scope="module")
def task_datasets(setup):
    from fastserve.services.preprocessing.corpus import publish_corpus

    stores, clm = setup
    pre = Preprocessing(stores)
    topics = {"builtin": {"name": "stdlib-docstrings", "max_documents": 300, "top_labels": 3}}
    tok = pre.run_train_tokenizer({"source": topics, "model": "wordpiece", "vocab_size": 300, "output_name": "wp"})
    cls = pre.run_build_dataset({"source": topics, "tokenizer_uri": tok["tokenizer_uri"], "max_length": 32,
                                 "task": "sequence_classification", "splits": {"validation_fraction": 0.2},
                                 "output_name": "cls"})
    pairs = publish_corpus(stores.artifacts, "pairs", [{"text": f"copy {i} {i + 1}", "target": f"{i} {i + 1}"}
                                                       for i in range(200)], {})
    utok = pre.run_train_tokenizer({"source": {"artifact_uri": pairs.uri}, "model": "unigram", "vocab_size": 150,
                                    "output_name": "uni"})
    s2s = pre.run_build_dataset({"source": {"artifact_uri": pairs.uri}, "tokenizer_uri": utok["tokenizer_uri"],
                                 "task": "seq2seq", "max_length": 12, "max_target_length": 8,
                                 "splits": {"validation_fraction": 0.1}, "output_name": "s2s"})
    return {"causal_lm": clm, "sequence_classification": cls["dataset_uri"], "seq2seq": s2s["dataset_uri"]}


def _accuracy(model_dir, stores, dataset_uri) -> float:
    """Share of validation rows a saved classifier labels right, by a forward pass of its own."""
    from transformers import AutoModelForSequenceClassification

    artifact = stores.artifacts.resolve(dataset_uri)
    rows = DatasetReader(artifact.path, artifact.manifest["metadata"]).arrays("validation")
    ids = torch.from_numpy(rows["input_ids"].astype(np.int64))
    mask = (torch.arange(ids.shape[1])[None, :] < torch.from_numpy(rows["lengths"].astype(np.int64))[:, None]).long()
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    with torch.no_grad():
        predicted = model(input_ids=ids, attention_mask=mask).logits.argmax(-1).numpy()
    return float((predicted == rows["labels"]).mean())


@pytest.mark.parametrize("family, task", [("gpt2", "causal_lm"), ("llama", "sequence_classification"),
                                          ("bert", "sequence_classification"), ("t5", "seq2seq")])
def test_every_family_trains_and_publishes(setup, task_datasets, family, task):
    from transformers import AutoConfig

    stores, _ = setup
    core = Training(stores)
    p = params(task_datasets[task], max_steps=12, eval_interval_steps=6)
    p["task"], p["model"]["architecture"]["family"], p["output_name"] = task, family, f"{family}-{task}"
    prepared = core.prepare(p)
    model, outcome = core.train(prepared, f"job-{family}", Recorder(core, f"job-{family}"))
    evals = [h for h in outcome.history if "eval_loss" in h]
    assert outcome.steps == 12 and [h["step"] for h in evals] == [6, 12]
    # The metrics reported are the final evaluation's, not a stale one.
    assert outcome.metrics["eval_loss"] == evals[-1]["eval_loss"]
    if task != "sequence_classification":
        # Twelve steps are enough to learn token frequencies: the validation loss falls between the two
        # evaluations and is below a uniform guess over the vocabulary (what an untrained model scores).
        vocab = model.config.vocab_size
        assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] < math.log(vocab), (evals, vocab)
        assert outcome.metrics["eval_perplexity"] == pytest.approx(math.exp(outcome.metrics["eval_loss"]))
    result = core.publish_model(prepared, model, outcome, f"job-{family}")
    path = stores.artifacts.resolve(result["model_uri"]).path
    if task == "sequence_classification":
        # The accuracy reported is what the published model gets right on the validation split, recounted here.
        assert outcome.metrics["eval_accuracy"] == pytest.approx(_accuracy(path, stores, task_datasets[task]))
    assert AutoConfig.from_pretrained(str(path)).model_type == family
    assert (path / "tokenizer.json").exists() and (path / "model.safetensors").exists()
