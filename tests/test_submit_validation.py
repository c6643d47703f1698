"""Submit-time validation: what would fail on a worker is refused at submit, naming the field."""

from __future__ import annotations

import math

import pytest

from fastserve.runtime.errors import InvalidArgument
from fastserve.services.optimization.core import MAX_STEPS, check_steps
from fastserve.services.preprocessing.dataset_builder import DatasetSpec
from fastserve.services.training.spec import Hyperparameters, _check_hyper
from tests.support.rpc import field_of as only_field

EXPORT = {"type": "export", "precision": "fp32"}


def field_of(call, *args) -> str:
    with pytest.raises(InvalidArgument) as caught:
        call(*args)
    return only_field(caught.value)


@pytest.mark.parametrize(("steps", "field"), [
    ([{**EXPORT, "opset": 17}], "steps[0].export.opset"),
    ([{**EXPORT, "opset": 21}], "steps[0].export.opset"),
    ([{"type": "prune", "method": "magnitude_unstructured", "sparsity": 0.1}] * (MAX_STEPS + 1), "steps"),
])
def test_optimization_steps(steps: list, field: str):
    assert field_of(check_steps, steps, "cpu") == field
    check_steps([{**EXPORT, "opset": 0}], "cpu")
    check_steps([{**EXPORT, "opset": 20}], "cpu")


@pytest.mark.parametrize(("change", "field"), [
    ({"learning_rate": math.nan}, "hyperparameters.learning_rate"),
    ({"learning_rate": math.inf}, "hyperparameters.learning_rate"),
    ({"weight_decay": math.nan}, "hyperparameters.weight_decay"),
    ({"max_grad_norm": math.inf}, "hyperparameters.max_grad_norm"),
    ({"max_grad_norm": math.nan}, "hyperparameters.max_grad_norm"),
    ({"seed": -1}, "hyperparameters.seed"),
    ({"seed": 2**32}, "hyperparameters.seed"),
])
def test_training_hyperparameters(change: dict, field: str):
    assert field_of(_check_hyper, Hyperparameters(**{"learning_rate": 1e-3, **change})) == field


@pytest.mark.parametrize(("spec", "field"), [
    (DatasetSpec("sequence_classification", 16, label_field="text"), "label_field"),
    (DatasetSpec("seq2seq", 16, target_field="text"), "target_field"),
    (DatasetSpec("causal_lm", 16, seed=-1), "splits.seed"),
])
def test_dataset_spec(spec: DatasetSpec, field: str):
    stats = {"documents": 100, "with_label": 100, "with_target": 100}
    assert field_of(spec.check, stats) == field
