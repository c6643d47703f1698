"""The `fastserve` console script as a user runs it, against a real inference server process (and a
scripted training server for job watching): JSON that parses, vectors, streamed text, and errors as
one line with a non-zero exit and no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastserve.client import FastServeClient, sampling_params
from fastserve.runtime.config import Config
from tests.support import scripted
from tests.support.processes import free_port
from tests.test_client import MINILM

FASTSERVE = Path(sys.executable).with_name("fastserve")


@pytest.fixture(scope="module")
def training(tmp_path_factory):
    running = scripted.serve(scripted.ScriptedTraining(break_after=2),
                             Config.from_env({"FASTSERVE_HOME": str(tmp_path_factory.mktemp("train"))}))
    yield running
    running.stop(0)


@pytest.fixture(scope="module")
def fastserve(gpt_server, training, tmp_path_factory):
    env = {**os.environ, "FASTSERVE_HOME": str(tmp_path_factory.mktemp("cli-home")),
           "FASTSERVE_INFERENCE_PORT": str(gpt_server.port), "FASTSERVE_TRAINING_PORT": str(training.port)}

    def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(FASTSERVE), *args], env=env, capture_output=True, text=True, timeout=timeout)
    return run


def test_models_list_json(fastserve):
    result = fastserve("models", "list", "--json")
    assert result.returncode == 0, result.stderr
    models = {m["name"]: m for m in json.loads(result.stdout)}
    assert models[MINILM]["state"] == "MODEL_STATE_READY"
    assert json.loads(fastserve("--json", "models", "list").stdout) == list(models.values())  # global flag too
    table = fastserve("models", "list")
    assert table.returncode == 0 and MINILM in table.stdout and "ready" in table.stdout


def test_embed_prints_a_vector(fastserve, gpt_server):
    result = fastserve("embed", "FastServe takes a model from raw text to an endpoint.")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    vector = json.loads(lines[0])
    with FastServeClient(ports={"inference": gpt_server.port}) as fs:
        expected = fs.inference.embed(MINILM, ["FastServe takes a model from raw text to an endpoint."])
    assert vector == pytest.approx(list(expected.embeddings[0].values), abs=1e-6) and len(vector) == 384

    both = json.loads(fastserve("embed", "one", "two", "--json").stdout)
    assert both["dimension"] == 384 and len(both["embeddings"]) == 2


@pytest.mark.parametrize("args, start, field", [
    (("classify", "--model", MINILM, "an embedding model cannot classify"), "INVALID_ARGUMENT: ", "(field model)"),
    (("embed", "--model", "no-such-model", "x"), "NOT_FOUND: ", None),
    (("optimize", "submit", "m", "--step", "prune:nope", "--output", "o"), "INVALID_ARGUMENT: ",
     "(field steps[0].prune.method)"),
])
def test_an_error_is_one_line_and_a_non_zero_exit(fastserve, args, start, field):
    result = fastserve(*args)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(start)
    assert (field in result.stderr) if field else "(field" not in result.stderr


def test_load_generate_and_unload(fastserve, gpt_server):
    loaded = fastserve("models", "load", "gpt", "--uri", "artifact://models/tiny-gpt/1", "--json")
    assert loaded.returncode == 0, loaded.stderr
    assert json.loads(loaded.stdout)["state"] == "MODEL_STATE_READY"
    try:
        streamed = fastserve("generate", "Return the", "--model", "gpt", "--max-new-tokens", "12")
        assert streamed.returncode == 0, streamed.stderr
        with FastServeClient(ports={"inference": gpt_server.port}) as fs:
            expected = fs.inference.generate("gpt", "Return the", sampling_params(max_new_tokens=12)).text
        assert streamed.stdout == expected + "\n"
        whole = json.loads(fastserve("generate", "Return the", "--model", "gpt", "--max-new-tokens", "12",
                                     "--json").stdout)
        assert whole["text"] == expected and whole["finish_reason"] == "FINISH_REASON_LENGTH"
    finally:
        assert fastserve("models", "unload", "gpt").returncode == 0
    assert "gpt" not in [m["name"] for m in json.loads(fastserve("models", "list", "--json").stdout)]


def test_train_watch_follows_a_job_through_a_broken_stream(fastserve):
    lines = fastserve("train", "watch", scripted.JOB_ID, "--json")
    assert lines.returncode == 0, lines.stderr
    assert [json.loads(line)["event_id"] for line in lines.stdout.splitlines()] == ["1", "2", "3", "4", "5"]

    live = fastserve("train", "watch", scripted.JOB_ID)
    assert live.returncode == 0, live.stderr
    assert "loss 1.2500 · 1,200 tok/s · ETA 0:00:00" in live.stdout
    assert "artifact artifact://checkpoints/job-1/step-5" in live.stdout
    assert f"job {scripted.JOB_ID} SUCCEEDED" in live.stdout and "artifact://models/scripted/1" in live.stdout

    missing = fastserve("train", "watch", "no-such-job")
    assert missing.returncode == 1 and missing.stderr.startswith("NOT_FOUND: ") and missing.stdout == ""


def test_health_as_the_container_check_runs_it(fastserve, gpt_server):
    assert fastserve("health", "--port", str(gpt_server.port)).stdout.strip() == "SERVING"
    down = fastserve("health", "--port", str(free_port()))
    assert down.returncode == 1 and down.stdout.strip() == "UNREACHABLE"


def test_a_bad_setting_is_one_line_naming_the_variable(fastserve):
    result = subprocess.run([str(FASTSERVE), "models", "list"], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "FASTSERVE_INFERENCE_PORT": "abc"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "fastserve: FASTSERVE_INFERENCE_PORT='abc' is not a valid int"
