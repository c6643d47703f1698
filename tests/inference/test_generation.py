"""Text generation end to end: a real inference server with small GPT-2 and Llama models trained here,
greedy parity with transformers' generate, streaming, cancellation, MLFQ ordering, overload, bad input
and the KServe v2 generation paths."""

from __future__ import annotations

import functools
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import psutil
import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

from fastserve.inference.v1 import inference_pb2 as pb
from fastserve.kserve.v2 import grpc_service_pb2 as kpb
from fastserve.services.gateway.dashboard.metrics_scrape import QUEUE_LENGTH
from fastserve.storage.artifacts import ArtifactStore
from tests.support.metrics import metric
from tests.support.processes import free_port, serving_models
from tests.support.rpc import field_of, from_raw_bytes, raw_bytes
from tests.support.tiny_models import build_causal_lm, build_seq2seq
from tests.support.waiting import wait_until

PROMPTS = ["Return the number of", "Create a new", "This module provides", "If the file", "x"]
FAMILIES = ("gpt2", "llama", "t5")  # t5: an encoder-decoder


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen") / "home"
    store = ArtifactStore(root / "artifacts")
    for family in ("gpt2", "llama"):
        with store.publish("models", f"tiny-{family}") as draft:
            build_causal_lm(draft.path, family, positions=1024)
    with store.publish("models", "tiny-t5") as draft:
        build_seq2seq(draft.path)
    return root


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def server(home, tmp_path_factory, metrics_port):
    models = {family: f"artifact://models/tiny-{family}/1" for family in FAMILIES}
    with serving_models(home, tmp_path_factory.mktemp("l") / "inf.log", models,
                        FASTSERVE_INFERENCE_METRICS_PORT=str(metrics_port)) as proc:
        yield proc


def statistics(stub, name: str) -> pb.ModelStatistics:
    return stub.GetModelStatistics(pb.GetModelStatisticsRequest(name=name)).stats[0]


def load(stub, name: str, family: str = "gpt2", **config) -> None:
    batching = pb.BatchingConfig(max_batch_size=config.pop("max_batch_size", 8),
                                 max_queue_size=config.pop("max_queue_size", 64))
    stub.LoadModel(pb.LoadModelRequest(name=name, model_uri=f"artifact://models/tiny-{family}/1",
                                       config=pb.ModelConfig(batching=batching, **config)))


def greedy(prompt: str, n: int = 40, **sampling) -> pb.GenerateRequest:
    return pb.GenerateRequest(model=sampling.pop("model", "gpt2"), text=prompt,
                              sampling=pb.SamplingParams(max_new_tokens=n, **sampling))


def model_folder(home, family: str) -> Path:
    return ArtifactStore(home / "artifacts").resolve(f"artifact://models/tiny-{family}/1").path


@functools.cache
def reference_model(folder: Path):
    seq2seq = AutoConfig.from_pretrained(str(folder)).is_encoder_decoder
    return (AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM).from_pretrained(str(folder)).eval()


def hf_greedy(home, family: str, prompt_ids: list[int], n: int) -> list[int]:
    """transformers' own generate on the same folder, cut before its EOS as the service does."""
    model = reference_model(model_folder(home, family))
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    # An encoder-decoder's output opens with its start token; a decoder's with the prompt.
    new = out[0, 1 if model.config.is_encoder_decoder else len(prompt_ids):].tolist()
    eos = model.generation_config.eos_token_id
    return new[:new.index(eos)] if eos in new else new


def prompt_ids(home, family: str, text: str) -> list[int]:
    tokenizer = Tokenizer.from_file(str(model_folder(home, family) / "tokenizer.json"))
    return tokenizer.encode(text, add_special_tokens=family == "t5").ids


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_decoding_matches_transformers_generate_under_concurrency(home, stub, family):
    requests = [greedy(p, 12 + 9 * i, model=family) for i, p in enumerate(PROMPTS)] * 3
    before = statistics(stub, family).batch_sizes  # the model is shared: count this test's steps alone
    with ThreadPoolExecutor(len(requests)) as pool:
        replies = list(pool.map(stub.Generate, requests))
    references = {}  # each distinct request once: the requests repeat three times
    for request, reply in zip(requests, replies, strict=True):
        key = (request.text, request.sampling.max_new_tokens)
        if key not in references:
            ids = prompt_ids(home, family, request.text)
            references[key] = ids, hf_greedy(home, family, ids, request.sampling.max_new_tokens)
        ids, expected = references[key]
        assert list(reply.token_ids) == expected
        assert reply.usage.completion_tokens == len(expected)
        assert reply.usage.prompt_tokens == len(ids)
        assert reply.finish_reason == (pb.FINISH_REASON_LENGTH if len(expected) == request.sampling.max_new_tokens
                                       else pb.FINISH_REASON_EOS)
    after = statistics(stub, family).batch_sizes
    shared = {size: n - before.get(size, 0) for size, n in after.items() if size > 1 and n > before.get(size, 0)}
    assert shared, (dict(before), dict(after))  # sequences really shared decode steps


def test_token_id_prompts_and_text_prompts_agree(home, stub):
    by_text = stub.Generate(greedy(PROMPTS[0], 20))
    by_ids = stub.Generate(pb.GenerateRequest(model="gpt2", sampling=pb.SamplingParams(max_new_tokens=20),
                                              token_ids=pb.TokenIds(ids=prompt_ids(home, "gpt2", PROMPTS[0]))))
    assert list(by_ids.token_ids) == list(by_text.token_ids) and by_ids.text == by_text.text


def test_streaming_yields_the_unary_completion(stub):
    for prompt in PROMPTS[:3]:
        unary = stub.Generate(greedy(prompt, 48))
        request = pb.GenerateStreamRequest(model="gpt2", text=prompt, sampling=pb.SamplingParams(max_new_tokens=48))
        chunks = list(stub.GenerateStream(request))
        assert len(chunks) > 1
        assert "".join(c.text for c in chunks) == unary.text
        assert [t for c in chunks for t in c.token_ids] == list(unary.token_ids)
        assert all(c.finish_reason == pb.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])
        last = chunks[-1]
        assert last.finish_reason == unary.finish_reason and last.usage.completion_tokens == len(unary.token_ids)
        assert 0 < last.usage.time_to_first_token_ms <= last.usage.total_time_ms


def test_stop_sequences_and_stop_tokens_end_the_completion_before_them(stub):
    sampled = {"temperature": 0.9, "seed": 11}  # varied text, the same on every call
    full = stub.Generate(greedy(PROMPTS[1], 60, **sampled))
    text = full.text
    spots = [i for i in range(1, len(text) - 2) if text[i:i + 2].strip() == text[i:i + 2]]  # no edge spaces
    stop = text[min(spots, key=lambda i: abs(i - len(text) // 2)):][:2]
    cut = stub.Generate(greedy(PROMPTS[1], 60, stop_sequences=[stop], **sampled))
    assert cut.finish_reason == pb.FINISH_REASON_STOP and cut.text == text[:text.index(stop)]
    streamed = "".join(c.text for c in stub.GenerateStream(pb.GenerateStreamRequest(
        model="gpt2", text=PROMPTS[1], sampling=pb.SamplingParams(max_new_tokens=60, stop_sequences=[stop],
                                                                  **sampled))))
    assert streamed == cut.text
    token = full.token_ids[len(full.token_ids) // 2]
    by_token = stub.Generate(greedy(PROMPTS[1], 60, stop_token_ids=[token], **sampled))
    assert by_token.finish_reason == pb.FINISH_REASON_STOP
    assert list(by_token.token_ids) == list(full.token_ids[:list(full.token_ids).index(token)])


def test_sampling_is_reproducible_with_a_seed(stub):
    def sample(seed: int) -> list[int]:
        return list(stub.Generate(greedy(PROMPTS[2], 30, temperature=1.0, top_k=50, top_p=0.9,
                                         repetition_penalty=1.2, seed=seed)).token_ids)

    assert sample(7) == sample(7)
    assert len({tuple(sample(seed)) for seed in range(4)}) > 1


def test_cancelling_a_stream_frees_its_slot_for_a_queued_request(stub, metrics_port):
    load(stub, "one-slot", max_batch_size=1)
    stream = stub.GenerateStream(pb.GenerateStreamRequest(model="one-slot", text=PROMPTS[0],
                                                          sampling=pb.SamplingParams(max_new_tokens=1000)))
    next(stream)  # the long generation holds the only slot
    queued = stub.Generate.future(greedy(PROMPTS[1], 5, model="one-slot"), timeout=60)
    # Read on while polling: a stream nobody reads holds the engine back (its output is bounded).
    wait_until(lambda: next(stream) and metric(metrics_port, QUEUE_LENGTH, model="one-slot/1") == 1,
               "the second request to wait for the slot")
    seen = time.monotonic()
    for _ in range(20):
        next(stream)  # the stream goes on while the request waits
    assert not queued.done()
    held = time.monotonic() - seen
    stream.cancel()
    reply = queued.result()
    # It waited at least from when it was seen waiting until the stream gave up the slot.
    assert reply.usage.completion_tokens == 5 and reply.usage.queue_time_ms >= held * 1e3
    with pytest.raises(grpc.RpcError) as error:
        list(stream)
    assert error.value.code() == grpc.StatusCode.CANCELLED
    stats = stub.GetModelStatistics(pb.GetModelStatisticsRequest(name="one-slot")).stats[0]
    assert stats.inference_count < 1000  # the cancelled stream stopped generating
    stub.UnloadModel(pb.UnloadModelRequest(name="one-slot"))


@pytest.mark.parametrize("policy,short_first", [(pb.SCHEDULING_POLICY_MLFQ, True),
                                                (pb.SCHEDULING_POLICY_FCFS, False)])
def test_a_short_job_behind_a_long_one_finishes_first_only_with_mlfq(stub, policy, short_first):
    name = f"policy-{policy}"
    load(stub, name, max_batch_size=1, scheduling=policy)
    done: list[str] = []
    long_call = stub.Generate.future(greedy(PROMPTS[0], 1000, model=name), timeout=120)
    long_call.add_done_callback(lambda _: done.append("long"))
    # Quanta of 8, 16 and 32 tokens: past 64 generated tokens the long job has left the top levels.
    wait_until(lambda: statistics(stub, name).inference_count >= 64, "the long job to use up its first quanta",
               timeout=60)
    short = stub.Generate(greedy(PROMPTS[1], 4, model=name), timeout=120)
    done.append("short")
    long_reply = long_call.result()
    assert short.usage.completion_tokens > 0 and long_reply.usage.completion_tokens > 0
    assert (done[0] == "short") is short_first
    stub.UnloadModel(pb.UnloadModelRequest(name=name))


def test_overload_is_refused_and_memory_stays_bounded(server, stub):
    load(stub, "small", max_batch_size=2, max_queue_size=4)  # holds 2 running + 4 waiting sequences
    process = psutil.Process(server.process.pid)
    before = process.memory_info().rss
    results = {"ok": 0, "refused": 0}
    lock = threading.Lock()

    def call(i: int) -> None:
        try:
            stub.Generate(greedy(PROMPTS[i % len(PROMPTS)], 100, model="small"), timeout=120)
            outcome = "ok"
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            outcome = "refused"
        with lock:
            results[outcome] += 1

    with ThreadPoolExecutor(24) as pool:  # 4x the 6 sequences the model holds
        list(pool.map(call, range(24)))
    assert results["ok"] >= 6 and results["refused"] >= 8, results
    assert process.memory_info().rss - before < 64 * 2**20
    assert stub.Generate(greedy(PROMPTS[0], 5, model="small")).usage.completion_tokens == 5
    stub.UnloadModel(pb.UnloadModelRequest(name="small"))


@pytest.mark.parametrize("sampling,field", [
    (pb.SamplingParams(max_new_tokens=0), "sampling.max_new_tokens"),
    (pb.SamplingParams(max_new_tokens=-3), "sampling.max_new_tokens"),
    (pb.SamplingParams(max_new_tokens=100000), "sampling.max_new_tokens"),
    (pb.SamplingParams(temperature=-0.5), "sampling.temperature"),
    (pb.SamplingParams(top_p=1.5), "sampling.top_p"),
    (pb.SamplingParams(top_p=-0.1), "sampling.top_p"),
    (pb.SamplingParams(top_k=-1), "sampling.top_k"),
    (pb.SamplingParams(temperature=float("nan")), "sampling.temperature"),
    (pb.SamplingParams(temperature=float("inf")), "sampling.temperature"),
    (pb.SamplingParams(temperature=1e-38), "sampling.temperature"),
    (pb.SamplingParams(repetition_penalty=float("nan")), "sampling.repetition_penalty"),
    (pb.SamplingParams(seed=-1), "sampling.seed"),
])
def test_bad_sampling_parameters_are_invalid_arguments(stub, sampling, field):
    with pytest.raises(grpc.RpcError) as error:
        stub.Generate(pb.GenerateRequest(model="gpt2", text="hello", sampling=sampling))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field_of(error.value) == field


@pytest.mark.parametrize("generation,field", [
    (pb.GenerationConfig(mlfq_oldest_places=-1), "config.generation.mlfq_oldest_places"),
    (pb.GenerationConfig(kv_slots=-2), "config.generation.kv_slots"),
    (pb.GenerationConfig(mlfq_levels=-1), "config.generation.mlfq_levels"),
])
def test_bad_generation_settings_are_refused_when_loading(stub, generation, field):
    with pytest.raises(grpc.RpcError) as error:
        load(stub, "bad-settings", scheduling=pb.SCHEDULING_POLICY_MLFQ, generation=generation)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field_of(error.value) == field
    models = stub.ListModels(pb.ListModelsRequest()).models
    assert all(m.state != pb.MODEL_STATE_READY for m in models if m.name == "bad-settings")


def test_bad_prompts_are_refused_and_the_server_stays_up(stub):
    cases = [(pb.GenerateRequest(model="gpt2", text="word " * 600), grpc.StatusCode.INVALID_ARGUMENT, "text"),
             (pb.GenerateRequest(model="gpt2", text=""), grpc.StatusCode.INVALID_ARGUMENT, "text"),
             (pb.GenerateRequest(model="gpt2", token_ids=pb.TokenIds(ids=[1, 99999])),
              grpc.StatusCode.INVALID_ARGUMENT, "token_ids.ids[1]"),
             (pb.GenerateRequest(model="nope", text="hi"), grpc.StatusCode.NOT_FOUND, None)]
    for request, code, field in cases:
        with pytest.raises(grpc.RpcError) as error:
            stub.Generate(request)
        assert error.value.code() == code
        if field:
            assert field_of(error.value) == field
    assert stub.Generate(greedy("hello", 3)).usage.completion_tokens == 3


def kserve_request(model: str, text: str, **parameters) -> kpb.ModelInferRequest:
    params = {k: kpb.InferParameter(**{"int64_param" if isinstance(v, int) else "double_param"
                                       if isinstance(v, float) else "string_param": v})
              for k, v in parameters.items()}
    return kpb.ModelInferRequest(
        model_name=model, parameters=params,
        inputs=[kpb.ModelInferRequest.InferInputTensor(name="text_input", datatype="BYTES", shape=[1])],
        raw_input_contents=[raw_bytes([text.encode()])])


def output_text(response: kpb.ModelInferResponse) -> str:
    assert response.outputs[0].name == "text_output" and response.outputs[0].datatype == "BYTES"
    (text,) = from_raw_bytes(response.raw_output_contents[0])
    return text.decode()


def test_kserve_text_input_to_text_output_unary_and_streamed(stub, kserve):
    expected = stub.Generate(greedy(PROMPTS[2], 24)).text
    assert output_text(kserve.ModelInfer(kserve_request("gpt2", PROMPTS[2], max_tokens=24))) == expected
    meta = kserve.ModelMetadata(kpb.ModelMetadataRequest(name="gpt2"))
    assert [i.name for i in meta.inputs] == ["text_input"] and [o.name for o in meta.outputs] == ["text_output"]
    # A message the boundary refuses (a NaN) is answered in the stream, as one the model refuses is, and
    # the stream reads on: the request after it generates.
    responses = list(kserve.ModelStreamInfer(iter([kserve_request("gpt2", PROMPTS[2], temperature=math.nan),
                                                   kserve_request("gpt2", PROMPTS[2], max_tokens=24),
                                                   kserve_request("gpt2", PROMPTS[2], temperature=-1.0)])))
    assert "InvalidArgument" in responses[0].error_message and "temperature" in responses[0].error_message
    assert "finite" in responses[0].error_message
    responses = responses[1:]
    chunks = [r for r in responses if not r.error_message]
    assert "".join(output_text(r.infer_response) for r in chunks) == expected
    finals = [r.infer_response.parameters["triton_final_response"].bool_param for r in chunks]
    assert finals[-1] and not any(finals[:-1])
    assert "temperature" in responses[-1].error_message
    for parameters, field in (({"temperature": "nan"}, "parameters.temperature"),
                              ({"stop": "[1, 2]"}, "parameters.stop"), ({"top_k": "many"}, "parameters.top_k")):
        with pytest.raises(grpc.RpcError) as error:
            kserve.ModelInfer(kserve_request("gpt2", PROMPTS[2], **parameters))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field_of(error.value) == field
