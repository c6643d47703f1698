"""The dashboard's JSON API (`/ui/api/...`) and its static page, through real processes: the gateway over
the package's inference server, a training service with a Celery worker on the tests' Redis (its
preprocessing and optimization services left down), a real training job watched over server-sent events."""

from __future__ import annotations

import http.client
import json
import time

import httpx
import pytest

from fastserve.client import FastServeClient
from fastserve.runtime.config import Config
from fastserve.runtime.job_queue import submit
from fastserve.runtime.stores import Stores
from fastserve.services.gateway.dashboard.routes import STATIC
from fastserve.services.preprocessing.core import Preprocessing
from fastserve.training.v1 import training_pb2 as tpb
from tests.conftest import private_env
from tests.gateway.conftest import CHAT, TOKEN
from tests.support.processes import free_port, service_with_worker, start_gateway

AUTH = {"authorization": f"Bearer {TOKEN}"}
CORPUS = {"builtin": {"name": "stdlib-docstrings", "seed": 0, "max_documents": 300}}


@pytest.fixture(scope="module")
def stack(tmp_path_factory, redis_server):
    """A training service and a worker; (its port, the stores they share)."""
    root = tmp_path_factory.mktemp("dash")
    env = private_env(root / "home", redis_server.url)
    logs = root / "logs"
    logs.mkdir()
    with service_with_worker("training", env, logs) as (proc, _channel):
        yield proc.port, Stores.from_config(Config.from_env(env))


@pytest.fixture(scope="module")
def down_ports():
    return {"preprocessing": free_port(), "optimization": free_port()}


@pytest.fixture(scope="module")
def dash(inference, stack, metrics_port, down_ports, tmp_path_factory):
    """A gateway with a token that reaches the training service and inference's metrics; its base URL and log."""
    proc = start_gateway(inference, tmp_path_factory.mktemp("l") / "dash-gateway.log", TOKEN,
                         FASTSERVE_INFERENCE_METRICS_PORT=str(metrics_port), FASTSERVE_TRAINING_PORT=str(stack[0]),
                         FASTSERVE_PREPROCESSING_PORT=str(down_ports["preprocessing"]),
                         FASTSERVE_OPTIMIZATION_PORT=str(down_ports["optimization"]))
    yield f"http://127.0.0.1:{proc.port}", proc
    proc.stop()


@pytest.fixture(scope="module")
def api(dash):
    with httpx.Client(base_url=dash[0], headers=AUTH, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def dataset(stack):
    pre = Preprocessing(stack[1])
    tok = pre.run_train_tokenizer({"source": CORPUS, "model": "bpe", "vocab_size": 300, "output_name": "dash-bpe"})
    built = pre.run_build_dataset({"source": CORPUS, "tokenizer_uri": tok["tokenizer_uri"], "task": "causal_lm",
                                   "max_length": 32, "splits": {"validation_fraction": 0.1, "seed": 0},
                                   "output_name": "dash-clm"})
    return built["dataset_uri"]


def sse(response: httpx.Response):
    """The SSE messages of a streamed response as dicts of their fields (`data` parsed), as they come."""
    message: dict = {}
    for line in response.iter_lines():
        if not line:
            if message:
                yield message
            message = {}
        elif not line.startswith(":"):
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            message[field] = json.loads(value) if field == "data" else value


def test_page_is_open_and_the_api_needs_the_token(dash):
    base = dash[0]
    index = STATIC / "index.html"
    page = httpx.get(f"{base}/ui/")
    if index.is_file():
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert httpx.get(f"{base}/ui").text == page.text == index.read_text()
    else:
        assert page.status_code == 500 and "not installed" in page.json()["error"]["message"]
    assert httpx.get(f"{base}/ui/static/vendor/uplot/LICENSE").status_code in (200, 404)  # open either way
    assert httpx.get(f"{base}/ui/static/no-such.js").status_code == 404
    refused = httpx.get(f"{base}/ui/api/services")
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{base}/ui/api/models", headers={"authorization": "Bearer wrong"}).status_code == 401
    assert httpx.post(f"{base}/ui/api/models/unload", json={"name": CHAT}).status_code == 401
    statuses = {s["name"]: s["status"] for s in httpx.get(f"{base}/ui/api/services", headers=AUTH).json()["services"]}
    assert statuses == {"training": "SERVING", "inference": "SERVING", "preprocessing": "UNREACHABLE",
                        "optimization": "UNREACHABLE"}


@pytest.mark.parametrize("path", ["/ui/static/../routes.py", "/ui/static/%2e%2e/routes.py",
                                  "/ui/static/..%2F..%2Fapp.py", "/ui/static//etc/passwd",
                                  "/ui/static/vendor/../../views.py"])
def test_static_paths_stay_inside_the_static_folder(dash, path):
    # Sent raw: an HTTP library would resolve the dots itself.
    connection = http.client.HTTPConnection("127.0.0.1", int(dash[0].rsplit(":", 1)[1]), timeout=10)
    try:
        connection.request("GET", path)
        reply = connection.getresponse()
        body = reply.read()
    finally:
        connection.close()
    assert reply.status == 404 and b"import" not in body and b"root:" not in body


@pytest.mark.parametrize("method, path, body, param", [
    ("GET", "/ui/api/jobs?state=DONE", None, "state"),
    ("GET", "/ui/api/jobs?kind=inference", None, "kind"),
    ("GET", "/ui/api/jobs/nosuch/abc", None, "service"),
    ("GET", "/ui/api/jobs/training/a$b", None, "job_id"),
    ("GET", f"/ui/api/jobs/training/{'a' * 129}", None, "job_id"),
    ("POST", "/ui/api/jobs/inference/abc/cancel", None, "service"),
    ("GET", "/ui/api/jobs/training/abc/events?after=x" , None, "after"),
    ("GET", f"/ui/api/jobs/training/abc/events?after={'1' * 65}", None, "after"),
    ("GET", "/ui/api/jobs/optimization/a%20b/report", None, "job_id"),
    ("POST", "/ui/api/models/load", {"uri": "artifact://models/chat/1"}, "name"),
    ("POST", "/ui/api/models/load", {"name": "x", "uri": ""}, "uri"),
    ("POST", "/ui/api/models/load", {"name": "x", "uri": "u" * 1025}, "uri"),
    ("POST", "/ui/api/models/load", {"name": "x" * 257, "uri": "artifact://models/chat/1"}, "name"),
    ("POST", "/ui/api/models/load", {"name": "x", "uri": "artifact://models/chat/1", "version": 3}, "version"),
    ("POST", "/ui/api/models/unload", {"name": " "}, "name"),
    ("GET", "/ui/api/artifacts?kind=model", None, "kind"),
    ("GET", "/ui/api/artifacts/lineage", None, "uri"),
    ("GET", "/ui/api/artifacts/lineage?uri=/etc/passwd", None, "uri"),
])
def test_bad_fields_are_400s_that_name_them(api, method, path, body, param):
    reply = api.request(method, path, json=body)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param


def test_unknown_job_is_404_and_a_non_object_body_is_400(api):
    assert api.get("/ui/api/jobs/training/no-such-job").status_code == 404
    assert api.get("/ui/api/jobs/training/no-such-job/events").status_code == 404
    assert api.post("/ui/api/models/load", content=b"[1]", headers={"content-type": "application/json"}
                    ).status_code == 400
    assert api.post("/ui/api/models/load", content=b"{", headers={"content-type": "application/json"}
                    ).status_code == 400


def test_model_figures_are_windowed_between_calls(api):
    first = api.get("/ui/api/models").json()
    assert first["metrics_error"] is None
    for i in range(4):
        reply = api.post("/v1/chat/completions", json={"model": CHAT, "max_tokens": 8, "temperature": 0,
                                                       "messages": [{"role": "user", "content": f"hi {i}"}]})
        assert reply.status_code == 200, reply.text
    listed = api.get("/ui/api/models").json()
    assert listed["metrics_error"] is None
    chat = next(m for m in listed["models"] if m["name"] == CHAT)
    assert chat["ready"] and chat["state"] == "READY" and chat["task"] == "generation" and chat["version"] == "1"
    f = chat["figures"]
    assert f["tokens_per_second"] > 0 and f["requests_per_second"] > 0
    assert 0 < f["ttft_p50_ms"] <= f["ttft_p99_ms"] and 0 < f["latency_p50_ms"] <= f["latency_p99_ms"]
    assert 0 < f["batch_occupancy"] <= 1 and set(f["queue_by_level"]) and all(
        isinstance(n, int) for n in f["queue_by_level"].values())
    embed = next(m for m in listed["models"] if m["task"] == "embedding")
    assert embed["figures"]["tokens_per_second"] is None and not embed["generating"]


def test_load_and_unload_a_model(api):
    loaded = api.post("/ui/api/models/load", json={"name": "dash-chat", "uri": f"artifact://models/{CHAT}/1"})
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["name"] == "dash-chat" and loaded.json()["ready"]
    assert any(m["name"] == "dash-chat" for m in api.get("/ui/api/models").json()["models"])
    assert api.post("/ui/api/models/unload", json={"name": "dash-chat"}).json() == {"unloaded": "dash-chat"}
    assert api.post("/ui/api/models/unload", json={"name": "dash-chat"}).status_code == 404


def test_artifacts_and_lineage(api):
    models = api.get("/ui/api/artifacts?kind=models").json()["artifacts"]
    chat = next(a for a in models if a["name"] == CHAT)
    assert chat["uri"] == f"artifact://models/{CHAT}/1" and chat["kind"] == "models" and chat["version"] == 1
    assert chat["size_bytes"] > 0 and chat["create_time"]
    graph = api.get("/ui/api/artifacts/lineage", params={"uri": chat["uri"]}).json()
    assert graph["nodes"][0]["uri"] == chat["uri"] and isinstance(graph["edges"], list)
    assert api.get("/ui/api/artifacts/lineage", params={"uri": "artifact://models/none/1"}).status_code == 404


def test_a_training_job_listed_fetched_and_watched_to_its_end(api, stack, dataset, dash):
    with FastServeClient(ports={"training": stack[0]}) as fs:
        job = fs.training.submit_training_job(
            dataset_uri=dataset, output_name="dash-gpt",
            model=tpb.ArchitectureConfig(family=tpb.ARCHITECTURE_FAMILY_GPT2, num_layers=1, hidden_size=32,
                                         num_heads=2, max_position_embeddings=32),
            hyperparameters={"learning_rate": 3e-3, "batch_size": 8, "max_steps": 30, "warmup_steps": 2,
                             "log_interval_steps": 5, "eval_interval_steps": 15, "eval_batches": 2, "seed": 0})
    url = f"/ui/api/jobs/training/{job.job_id}/events"
    with api.stream("GET", url) as reply:
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
        messages = list(sse(reply))
    end = messages[-1]
    assert end["event"] == "end" and end["data"]["job_id"] == job.job_id and end["data"]["state"] == "SUCCEEDED"
    events = messages[:-1]
    assert all(m.get("id") and "event" not in m for m in events)
    assert events[0]["data"]["type"] == "STATE" and events[0]["data"]["state"] == "QUEUED"
    train = [m["data"]["data"] for m in events if m["data"]["type"] == "METRICS" and "loss" in m["data"]["data"]]
    assert train and all(k in train[0] for k in ("step", "loss", "learning_rate", "tokens_per_second"))
    assert any("eval_loss" in m["data"]["data"] for m in events if m["data"]["type"] == "METRICS")
    # Resumed after an event: exactly what followed it.
    with api.stream("GET", url, params={"after": events[2]["id"]}) as reply:
        again = list(sse(reply))
    assert [m["id"] for m in again[:-1]] == [m["id"] for m in events[3:]] and again[-1]["event"] == "end"

    shown = api.get(f"/ui/api/jobs/training/{job.job_id}").json()
    assert shown["state"] == "SUCCEEDED" and shown["progress"] == 1.0 and shown["result"]["model_uri"]
    assert shown["end_time"] >= shown["start_time"] >= shown["create_time"] and shown["params"]
    listed = api.get("/ui/api/jobs", params={"kind": "training", "state": "SUCCEEDED"}).json()
    assert job.job_id in [j["job_id"] for j in listed["jobs"]] and listed["errors"] == []
    everything = api.get("/ui/api/jobs").json()
    assert {e["service"] for e in everything["errors"]} == {"preprocessing", "optimization"}
    assert all("service unavailable at 127.0.0.1:" in e["message"] for e in everything["errors"])
    created = [j["create_time"] for j in everything["jobs"]]
    assert created == sorted(created, reverse=True)
    assert api.get("/ui/api/jobs/preprocessing/x").status_code == 503
    assert api.get(f"/ui/api/jobs/optimization/{job.job_id}/report").status_code == 503


def test_cancel_a_running_job_and_a_client_that_leaves_ends_its_watch(api, stack, dash):
    job = submit(stack[1], "training", "test.count", {"steps": 400, "delay": 0.05})
    url = f"/ui/api/jobs/training/{job.job_id}/events"
    # A watcher that leaves after one event: the gateway cancels its WatchJob call.
    with api.stream("GET", url) as reply:
        next(sse(reply))
    deadline = time.monotonic() + 20
    while f"the watch of job {job.job_id} was cancelled" not in dash[1].log_text():
        assert time.monotonic() < deadline, dash[1].log_text()[-2000:]
        time.sleep(0.1)
    with api.stream("GET", url) as reply:
        messages = sse(reply)
        for message in messages:
            if message["data"].get("type") == "PROGRESS":
                break
        cancelled = api.post(f"/ui/api/jobs/training/{job.job_id}/cancel").json()
        assert cancelled["cancel_requested"] and cancelled["state"] in ("CANCELLING", "CANCELLED")
        rest = list(messages)
    assert rest[-1]["event"] == "end" and rest[-1]["data"]["state"] == "CANCELLED"
    assert rest[-2]["data"]["state"] == "CANCELLED" and rest[-1]["data"]["progress"] < 1.0
