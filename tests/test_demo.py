"""`make demo` end to end, in its shortened plan: the real stack, every stage over gRPC, both models served."""

from __future__ import annotations

import math

from fastserve.runtime.config import SERVICES, Config
from fastserve.stack.demo import SAMPLE_PROMPTS, DemoPlan, run_demo
from fastserve.stack.processes import Stack
from tests.support.processes import free_port, port_open


def test_the_demo_pipeline_runs_every_stage_and_serves_both_models(env, capsys):
    config = Config.from_env({**env, **{f"FASTSERVE_{s.upper()}_PORT": str(free_port()) for s in SERVICES}})
    plan = DemoPlan.quick()
    figures = run_demo(config, plan, keep_running=False)
    out = capsys.readouterr().out
    assert [f"== {i}/6" in out for i in range(1, 7)] == [True] * 6 and "== summary" in out
    # An untrained model scores about the vocabulary's size; the trained one must have learnt something.
    assert math.isfinite(figures["gpt_loss"]) and 1 < figures["gpt_perplexity"] < 0.75 * plan.vocab_size, figures
    # The quick plan trains the classifier too little to beat the majority class; `make demo` does.
    assert 0 < figures["majority"] < 1 and "accuracy" in figures
    assert figures["size_after"] < figures["size_before"] and figures["backend_after"] == "onnxruntime"
    assert len(figures["samples"]) == 3  # each a prompt and its completion
    # A briefly trained model may end a sample at once (end of text drawn first); each one ran, and they wrote text.
    assert all(n >= 1 for n in figures["sample_tokens"]), figures["sample_tokens"]
    assert sum(len(sample) - len(prompt) for sample, prompt in zip(figures["samples"], SAMPLE_PROMPTS, strict=True)) \
        > 10, figures["samples"]
    assert len(figures["labels"]) == 3 and figures["embedding_dim"] == 384
    # The served classifier's lineage runs back through its fp32 source and its dataset.
    relations = {relation for _, relation, _ in figures["lineage"]}
    assert {"source_model", "dataset", "base_model"} <= relations, figures["lineage"]
    assert not any(port_open(config.port(s)) for s in SERVICES)  # keep_running=False took it down
    assert all(row["state"] == "STOPPED" for row in Stack(config).status())
