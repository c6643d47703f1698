"""The `fastserve` console script as a user runs it, against a real inference server process, a real
preprocessing server (tokenize) and a scripted training server for job watching: JSON that parses,
vectors, streamed text, token ids, and errors as one line naming the flag the user typed, with a
non-zero exit and no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastserve.client import FastServeClient, sampling_params
from fastserve.runtime.config import Config
from tests.conftest import private_env
from tests.support import scripted
from tests.support.processes import free_port, start_service
from tests.test_client import MINILM

FASTSERVE = Path(sys.executable).with_name("fastserve")


@pytest.fixture(scope="module")
def training(tmp_path_factory):
    running = scripted.serve(scripted.ScriptedTraining(break_after=2),
                             Config.from_env({"FASTSERVE_HOME": str(tmp_path_factory.mktemp("train"))}))
    yield running
    running.stop(0)


@pytest.fixture(scope="module")
def preprocessing(tmp_path_factory, redis_server):
    home = tmp_path_factory.mktemp("pre")
    proc = start_service("preprocessing", {**private_env(home / "home", redis_server.url), "HF_HUB_OFFLINE": "1"},
                         home)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def fastserve(gpt_server, training, preprocessing, tmp_path_factory):
    env = {**os.environ, "FASTSERVE_HOME": str(tmp_path_factory.mktemp("cli-home")),
           "FASTSERVE_INFERENCE_PORT": str(gpt_server.port), "FASTSERVE_TRAINING_PORT": str(training.port),
           "FASTSERVE_PREPROCESSING_PORT": str(preprocessing.port)}

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
    # The server names the request field `model`; the line names the flag that set it.
    (("classify", "--model", MINILM, "an embedding model cannot classify"), "INVALID_ARGUMENT: ", "(option --model)"),
    (("embed", "--model", "no-such-model", "x"), "NOT_FOUND: ", None),
    # Refused by the client before any call, as the server would: the flag too, never the field path.
    (("models", "load", "m", "--task", "nope"), "INVALID_ARGUMENT: task must be one of embedding, ",
     "(option --task)"),
    (("preprocess", "list", "--state", "nope"), "INVALID_ARGUMENT: ", "(option --state)"),
    (("optimize", "submit", "m", "--step", "prune:nope", "--output", "o"), "INVALID_ARGUMENT: ",
     "(option --step)"),
])
def test_an_error_is_one_line_and_a_non_zero_exit(fastserve, args, start, field):
    result = fastserve(*args)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(start), result.stderr
    assert result.stderr.rstrip().endswith(field) if field else "(" not in result.stderr


def test_a_stopped_stack_is_said_at_once(tmp_path):
    port = free_port()
    env = {**os.environ, "FASTSERVE_HOME": str(tmp_path), "FASTSERVE_INFERENCE_PORT": str(port)}
    start = time.monotonic()
    result = subprocess.run([str(FASTSERVE), "models", "list"], env=env, capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - start
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (f"fastserve: nothing answers at 127.0.0.1:{port} (inference): the stack is not "
                             "running? start it with `make up` (or `fastserve up`)\n")
    # The interpreter's start-up and no retries: the old backoff alone was 3 s (0.2 + 0.4 + 0.8 + 1.6).
    assert elapsed < 10

    jobs = subprocess.run([str(FASTSERVE), "--host", "localhost", "preprocess", "list"], capture_output=True,
                          text=True, timeout=60, env={**env, "FASTSERVE_PREPROCESSING_PORT": str(port)})
    assert jobs.returncode == 2
    assert jobs.stderr.startswith(f"fastserve: nothing answers at localhost:{port} (preprocessing): ")


def test_tokenize_prints_ids_and_tokens(fastserve, preprocessing):
    texts = ["FastServe takes a model.", "Return the value"]
    with FastServeClient(ports={"preprocessing": preprocessing.port}) as fs:
        expected = fs.preprocessing.tokenize("builtin://all-MiniLM-L6-v2", texts).results
    data = json.loads(fastserve("tokenize", *texts, "--json").stdout)
    assert data["tokenizer"] == "builtin://all-MiniLM-L6-v2"
    assert [(r["text"], r["ids"], r["tokens"]) for r in data["results"]] == \
        [(t, list(e.ids), list(e.tokens)) for t, e in zip(texts, expected, strict=True)]

    shown = fastserve("tokenize", *texts)
    assert shown.returncode == 0, shown.stderr
    for text, e in zip(texts, expected, strict=True):
        row = next(line for line in shown.stdout.splitlines() if line.startswith(text))
        assert json.dumps(list(e.ids)) in row and json.dumps(list(e.tokens)) in row
        assert f"  {len(e.ids)}  " in row

    special = json.loads(fastserve("tokenize", "hello", "--special-tokens", "--json").stdout)["results"][0]
    # Each text whole and alone: MiniLM's tokenizer.json pads to 128, which Tokenize does not apply.
    assert special["tokens"] == ["[CLS]", "hello", "[SEP]"]
    assert data["results"][1]["tokens"] == ["return", "the", "value"]

    missing = fastserve("tokenize", "x", "--tokenizer", "artifact://tokenizers/nope/1")
    assert missing.returncode == 1 and missing.stderr.startswith("NOT_FOUND: "), missing.stderr


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

        # The server's field is sampling.temperature; the user typed --temperature.
        bad = fastserve("generate", "x", "--model", "gpt", "--temperature", "-1")
        assert bad.returncode == 1
        assert bad.stderr == "INVALID_ARGUMENT: temperature must be 0 (greedy) or in [0.001, 100], got -1.0 " \
                         "(option --temperature)\n"
    finally:
        assert fastserve("models", "unload", "gpt").returncode == 0
    assert "gpt" not in [m["name"] for m in json.loads(fastserve("models", "list", "--json").stdout)]


def test_train_watch_follows_a_job_through_a_broken_stream(fastserve):
    lines = fastserve("train", "watch", scripted.JOB_ID, "--json")
    assert lines.returncode == 0, lines.stderr
    events = [json.loads(line) for line in lines.stdout.splitlines()]
    assert [e["event_id"] for e in events] == ["1", "2", "3", "4", "5"]
    # Struct numbers whole again (protobuf holds them as doubles); a float field stays a float.
    assert events[1]["data"] == {"loss": 2.5, "tokens_per_second": 1000, "eta_seconds": 65}
    assert type(events[1]["data"]["tokens_per_second"]) is int and type(events[3]["data"]["eta_seconds"]) is int
    assert type(events[3]["progress"]) is float and events[3]["progress"] == 1.0

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
