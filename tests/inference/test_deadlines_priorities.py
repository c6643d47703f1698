"""Deadlines and priorities through a real inference server: work whose deadline passed while queued is
never computed, a higher `priority` is served before lower-priority work queued earlier (Embed, Classify,
KServe's `priority` parameter, Generate), and a generation whose deadline passes mid-stream ends and frees
its sequence. README: "priorities, and work dropped before compute when its caller cancelled or its
deadline passed"; "Cancelling a call (or its deadline passing) frees its slot at the next step".

What is queued is observed, never assumed after a sleep: an encoder model here queues at most two
requests, so a RESOURCE_EXHAUSTED reply proves that two are waiting behind a running one; a generation
model's queue is read from its Prometheus gauge."""

from __future__ import annotations

import shutil
import time

import grpc
import pytest

from fastserve.inference.v1 import inference_pb2 as pb
from fastserve.kserve.v2 import grpc_service_pb2 as kpb
from fastserve.models.refs import BUILTIN_MODELS
from fastserve.services.gateway.dashboard.metrics_scrape import QUEUE_LENGTH
from fastserve.storage.artifacts import ArtifactStore
from tests.support.metrics import metric
from tests.support.processes import free_port, start_inference
from tests.support.rpc import raw_bytes
from tests.support.waiting import wait_until

MINILM = "all-MiniLM-L6-v2"
QUEUE = 2  # max_queue_size of the encoder models: one request runs, two wait, the next is refused
SLOW = ["a sentence long enough to keep the encoder busy for a little while " * 6] * 24  # one slow request
WAIT = 120.0  # bound of every wait and call: a loaded machine is slow, a wait that never ends fails
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.fixture(scope="module")
def metrics_port():
    return free_port()


@pytest.fixture(scope="module")
def server(tmp_path_factory, metrics_port):
    """A server with its Prometheus exporter on, a MiniLM classifier and a small GPT-2 without EOS (its
    completions run to their length) in its store."""
    from transformers import AutoModelForSequenceClassification

    from tests.support.tiny_models import build_causal_lm

    root = tmp_path_factory.mktemp("dp")
    store, source = ArtifactStore(root / "home" / "artifacts"), BUILTIN_MODELS[MINILM]()
    with store.publish("models", "topics") as draft:
        AutoModelForSequenceClassification.from_pretrained(
            str(source), num_labels=2, id2label={0: "no", 1: "yes"}, label2id={"no": 0, "yes": 1}).save_pretrained(
            str(draft.path))
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            shutil.copy(source / name, draft.path / name)
    with store.publish("models", "gpt") as draft:
        build_causal_lm(draft.path, train_steps=0, documents=300, vocab=300, positions=2048, eos=False)
    proc = start_inference(root / "home", root / "inf.log", FASTSERVE_INFERENCE_MODELS="none",
                           FASTSERVE_INFERENCE_METRICS_PORT=str(metrics_port))
    yield proc
    proc.stop()


@pytest.fixture(scope="module", autouse=True)
def models(stub):
    """Every model runs one request (or one sequence) at a time; the encoders queue at most QUEUE."""
    one = pb.BatchingConfig(enabled=True, max_batch_size=1, max_queue_size=QUEUE)
    stub.LoadModel(pb.LoadModelRequest(name="emb", model_uri=f"builtin://{MINILM}",
                                       config=pb.ModelConfig(batching=one)))
    stub.LoadModel(pb.LoadModelRequest(name="topics", model_uri="artifact://models/topics/1",
                                       config=pb.ModelConfig(batching=one)))
    stub.LoadModel(pb.LoadModelRequest(name="gpt", model_uri="artifact://models/gpt/1", config=pb.ModelConfig(
        batching=pb.BatchingConfig(enabled=True, max_batch_size=1), scheduling=pb.SCHEDULING_POLICY_FCFS)))


def stats(stub, name: str) -> pb.ModelStatistics:
    return stub.GetModelStatistics(pb.GetModelStatisticsRequest(name=name)).stats[0]


def senders(stub, kserve):
    """The three ways to send texts with a priority to an encoder: send(texts, priority, timeout) -> future."""
    def kserve_send(texts, priority, timeout=WAIT):
        items = [t.encode() for t in texts]
        return kserve.ModelInfer.future(kpb.ModelInferRequest(
            model_name="emb", parameters={"priority": kpb.InferParameter(int64_param=priority)},
            inputs=[kpb.ModelInferRequest.InferInputTensor(name="text", datatype="BYTES", shape=[len(items)])],
            raw_input_contents=[raw_bytes(items)]), timeout=timeout)

    return {
        "embed": lambda texts, priority, timeout=WAIT: stub.Embed.future(
            pb.EmbedRequest(model="emb", texts=texts, priority=priority), timeout=timeout),
        "classify": lambda texts, priority, timeout=WAIT: stub.Classify.future(
            pb.ClassifyRequest(model="topics", texts=texts, priority=priority), timeout=timeout),
        "kserve": kserve_send,
    }


def ok(call) -> bool:
    return call.done() and call.exception() is None


def saturate(send) -> tuple[list, list[str], float]:
    """Send QUEUE + 3 slow low-priority requests at once and wait until two are refused: then the other
    QUEUE + 1 are in (one running, QUEUE waiting). Then wait for the running one to finish: the worker has
    taken the next, so exactly one low-priority request waits. Returns the accepted calls, the order in
    which calls finish (their callbacks append names) and the seconds one slow request took."""
    finished: list[str] = []
    start = time.monotonic()
    calls = [send(SLOW, 0) for _ in range(QUEUE + 3)]

    def refused(call) -> bool:
        return call.done() and call.exception() is not None and call.code() == EXHAUSTED

    def full() -> bool:
        assert not any(map(ok, calls)), "a slow request finished before the queue filled: make SLOW slower"
        return sum(map(refused, calls)) >= 2

    wait_until(full, "two refusals from a full queue", timeout=WAIT)
    accepted = [c for c in calls if not refused(c)]
    assert len(accepted) == QUEUE + 1
    for call in accepted:
        call.add_done_callback(lambda c: finished.append("low"))
    wait_until(lambda: finished, "the running request to finish", timeout=WAIT)
    return accepted, finished, time.monotonic() - start


@pytest.mark.parametrize("protocol", ["embed", "classify", "kserve"])
def test_higher_priority_is_served_before_lower_priority_queued_earlier(stub, kserve, protocol):
    send = senders(stub, kserve)[protocol]
    accepted, finished, _ = saturate(send)
    # Now one low-priority request runs and one waits, queued before this high-priority one.
    high = send(["urgent"], 5)
    high.add_done_callback(lambda c: finished.append("high"))
    wait_until(lambda: all(c.done() for c in [*accepted, high]), "every request to finish", timeout=WAIT)
    assert all(ok(c) for c in [*accepted, high]), [c.exception() for c in [*accepted, high]]
    # First come first served would finish it last, after the low-priority one that waited before it.
    assert finished == ["low", "low", "high", "low"], finished


@pytest.mark.parametrize("busy", ["embed", "classify"])
def test_a_request_whose_deadline_passed_while_it_waited_is_not_computed(stub, kserve, busy):
    """It waits in its model's queue (busy: the same model) or, taken at once, for the process's one compute
    thread, which another model's batches hold (busy: the classifier; once computed all the same)."""
    send = senders(stub, kserve)
    before = stats(stub, "emb")
    accepted, _, slow_s = saturate(send[busy])
    # A slow request has just started and another waits: its deadline (half a slow request's time, at
    # most 0.25 s) passes long before its turn.
    expired = send["embed"](["too late"], 0, timeout=min(0.25, slow_s / 2))
    wait_until(lambda: all(c.done() for c in [*accepted, expired]), "every request to finish", timeout=WAIT)
    assert all(ok(c) for c in accepted)
    assert expired.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # A request sent after it finishes after its turn has come, whatever the batcher did with it.
    assert len(send["embed"](["after"], 0).result(timeout=WAIT).embeddings) == 1
    # The server counts a request once its wait ends: the expired one reached the batcher (it was not
    # refused or lost in transit) and failed. Had it been computed once its turn came, the model would
    # have made one embedding more than the slow requests and the last one.
    slow_here = len(accepted) if busy == "embed" else 0
    wait_until(lambda: stats(stub, "emb").request_count - before.request_count == slow_here + 2,
               "the server to count the expired request", timeout=WAIT)
    after = stats(stub, "emb")
    assert after.failure_count - before.failure_count == 1
    assert after.inference_count - before.inference_count == slow_here * len(SLOW) + 1


def generate(stub, tokens: int, priority: int = 0):
    return stub.Generate.future(pb.GenerateRequest(model="gpt", text="hello", priority=priority,
                                                   sampling=pb.SamplingParams(max_new_tokens=tokens)), timeout=WAIT)


def test_higher_priority_generation_runs_before_lower_priority_queued_earlier(stub, metrics_port):
    long = stub.GenerateStream(pb.GenerateStreamRequest(
        model="gpt", text="hello", sampling=pb.SamplingParams(max_new_tokens=300)), timeout=WAIT)
    next(long)  # it runs: the model steps one sequence at a time
    low = generate(stub, 8)
    # The scheduler holds it, not running: queued behind the long one, before the high-priority one.
    wait_until(lambda: metric(metrics_port, QUEUE_LENGTH, model="gpt/1", level="0") >= 1,
               "the low-priority request to queue", timeout=WAIT)
    high = generate(stub, 8, priority=5)
    assert len(high.result(timeout=WAIT).token_ids) == 8
    # First come first served would run the long one to its end, then the low one, and only then this.
    assert not low.done()
    rest = list(long)
    assert rest and rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert len(low.result(timeout=WAIT).token_ids) == 8


def test_a_generation_deadline_ends_the_sequence_and_frees_its_slot(stub):
    before = stats(stub, "gpt")
    budget = 2000  # far more tokens than the deadline leaves time for
    stream = stub.GenerateStream(pb.GenerateStreamRequest(
        model="gpt", text="hello", sampling=pb.SamplingParams(max_new_tokens=budget)), timeout=1.5)
    chunks = []
    with pytest.raises(grpc.RpcError) as info:
        for chunk in stream:
            chunks.append(chunk)
    # It ended mid-generation: some tokens came, none said it finished.
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert chunks and not any(c.finish_reason for c in chunks)
    # The model runs one sequence at a time in its one KV slot: this gets the slot only once the engine has
    # ended the expired sequence, not after running it to its 2000 tokens.
    after_call = generate(stub, 8).result(timeout=WAIT)
    assert len(after_call.token_ids) == 8 and after_call.finish_reason == pb.FINISH_REASON_LENGTH
    generated = stats(stub, "gpt").inference_count - before.inference_count
    assert 8 < generated < budget, generated
