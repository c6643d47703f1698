"""A version swap of a generation model with streams in flight loses none: loading version 2 while
version 1 is streaming lets every stream (running or still queued on version 1) finish there, whole,
while new requests go to version 2. The two versions are decoders at different random weights (no EOS,
so a completion runs to its length) and give different greedy text, which tells them apart."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from fastserve.inference.v1 import inference_pb2 as pb
from fastserve.kserve.v2 import grpc_service_pb2 as kpb
from fastserve.storage.artifacts import ArtifactStore
from tests.support.processes import serving_models
from tests.support.rpc import raw_bytes
from tests.support.tiny_models import build_decoder
from tests.support.waiting import wait_until

NAME = "swap"
LONG = 128  # within the 256-token window after the prompt
SHORT = 16  # enough tokens to tell the versions apart
PROMPTS = ["Return the number of", "Create a new", "If the file", "This module provides"]
# Eight streams, two running at a time (max_batch_size 2), the rest queued behind them: four rounds of LONG
# steps, so version 2 loads and warms while version 1 still has most of its work ahead of it.
STREAMS = PROMPTS * 2


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("swap") / "home"
    with ArtifactStore(root / "artifacts").publish("models", NAME) as draft:
        build_decoder(draft.path, "gpt2", seed=0)
    return root


@pytest.fixture(scope="module")
def server(home, tmp_path_factory):
    with serving_models(home, tmp_path_factory.mktemp("l") / "inf.log", {NAME: f"artifact://models/{NAME}/1"},
                        pb.ModelConfig(batching=pb.BatchingConfig(max_batch_size=2))) as proc:
        yield proc


def greedy(prompt: str, n: int = LONG, version: str = "") -> pb.GenerateRequest:
    return pb.GenerateRequest(model=NAME, version=version, text=prompt, sampling=pb.SamplingParams(max_new_tokens=n))


@dataclass
class Follower:
    """One stream read to its end on its own thread: its chunks, or the error that ended it."""

    prompt: str
    chunks: list[pb.GenerateStreamResponse] = field(default_factory=list)
    error: grpc.RpcError | None = None
    first: threading.Event = field(default_factory=threading.Event)
    ended: threading.Event = field(default_factory=threading.Event)

    def read(self, stub) -> None:
        request = pb.GenerateStreamRequest(model=NAME, text=self.prompt,
                                           sampling=pb.SamplingParams(max_new_tokens=LONG))
        try:
            for chunk in stub.GenerateStream(request, timeout=300):
                self.chunks.append(chunk)
                self.first.set()
        except grpc.RpcError as error:
            self.error = error
        finally:
            self.ended.set()


def versions(stub) -> dict[str, int]:
    return {m.version: m.state for m in stub.ListModels(pb.ListModelsRequest()).models if m.name == NAME}


def kserve_version(kserve, prompt: str) -> str:
    return kserve.ModelInfer(kpb.ModelInferRequest(
        model_name=NAME, parameters={"max_tokens": kpb.InferParameter(int64_param=4)},
        inputs=[kpb.ModelInferRequest.InferInputTensor(name="text_input", datatype="BYTES", shape=[1])],
        raw_input_contents=[raw_bytes([prompt.encode()])])).model_version


def test_streams_in_flight_finish_on_version_1_while_version_2_takes_new_requests(home, stub, kserve):
    with ThreadPoolExecutor(len(PROMPTS)) as pool:  # what version 1 gives: the streams must give the same
        v1 = dict(zip(PROMPTS, pool.map(lambda p: stub.Generate(greedy(p)), PROMPTS), strict=True))
    assert all(r.usage.completion_tokens == LONG for r in v1.values())
    store = ArtifactStore(home / "artifacts")
    with store.publish("models", NAME) as draft:  # version 2: other weights, the same tokenizer
        build_decoder(draft.path, "gpt2", seed=1,
                      tokenizer_from=store.resolve(f"artifact://models/{NAME}/1").path)
    assert draft.ref.version == 2

    followers = [Follower(p) for p in STREAMS]
    threads = [threading.Thread(target=f.read, args=(stub,), daemon=True) for f in followers]
    for thread in threads:
        thread.start()
    wait_until(lambda: any(f.first.is_set() for f in followers), "version 1 to start streaming", timeout=120)
    load = stub.LoadModel.future(pb.LoadModelRequest(name=NAME, model_uri=f"artifact://models/{NAME}/2"),
                                 timeout=300)
    wait_until(lambda: versions(stub).get("2") == pb.MODEL_STATE_READY or load.done(), "version 2 to be READY",
               timeout=120)
    # Version 2 serves now, and some streams have not ended: they are what the swap must not lose (had they
    # all ended already, the test would prove nothing).
    in_flight = [f for f in followers if not f.ended.is_set()]
    assert in_flight, "every stream ended before version 2 took over"
    new = stub.Generate(greedy(PROMPTS[0], SHORT))
    assert kserve_version(kserve, PROMPTS[0]) == "2"

    status = load.result().status
    assert status.version == "2" and status.state == pb.MODEL_STATE_READY
    for follower in followers:
        assert follower.ended.wait(300), f"a stream of {follower.prompt!r} did not end"
    # Every stream, running or queued when the swap came, ran whole on version 1: no error, no cut (a
    # drained engine that dropped its queue or cancelled its sequences would end them CANCELLED or short).
    for follower in followers:
        assert follower.error is None, f"{follower.prompt!r}: {follower.error}"
        last, expected = follower.chunks[-1], v1[follower.prompt]
        assert last.finish_reason == pb.FINISH_REASON_LENGTH and last.usage.completion_tokens == LONG
        assert [t for c in follower.chunks for t in c.token_ids] == list(expected.token_ids)
        assert "".join(c.text for c in follower.chunks) == expected.text
    # The request sent after the swap was version 2's: its greedy output, not version 1's.
    assert list(new.token_ids) == list(stub.Generate(greedy(PROMPTS[0], SHORT, version="2")).token_ids)
    assert list(new.token_ids) != list(v1[PROMPTS[0]].token_ids[:SHORT])
    assert versions(stub) == {"2": pb.MODEL_STATE_READY}  # version 1 drained and unloaded
    print(f"{len(in_flight)} of {len(followers)} streams in flight at the swap")
