"""Stop sequences that cross a token boundary, through real servers: a gRPC stream (GPT-2 and the
encoder-decoder T5), the OpenAI gateway's stream with the official client, and KServe v2's `stop`
parameter (unary and streamed). Each stop is built from the model's own greedy output so that its first
character comes from one token and its last from the next: no single token's text holds it, so only a
check on the joined text (with the characters that could start it held back) can honour it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from openai import OpenAI
from tokenizers import Tokenizer

from fastserve.inference.v1 import inference_pb2 as pb
from fastserve.kserve.v2 import grpc_service_pb2 as kpb
from fastserve.storage.artifacts import ArtifactStore
from tests.support.processes import serving_models, start_gateway
from tests.support.rpc import from_raw_bytes, raw_bytes
from tests.support.tiny_models import build_decoder, build_seq2seq

MAX = 48
# The decoder (random weights, no EOS) runs to MAX tokens; the T5 has learnt to copy, so a longer source.
PROMPTS = {"gpt2": "Return the number of", "t5": "Return the number of items in the container, if any."}


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stops") / "home"
    store = ArtifactStore(root / "artifacts")
    with store.publish("models", "tiny-gpt2") as draft:
        build_decoder(draft.path, "gpt2")
    with store.publish("models", "tiny-t5") as draft:
        build_seq2seq(draft.path)
    return root


@pytest.fixture(scope="module")
def server(home, tmp_path_factory):
    models = {model: f"artifact://models/tiny-{model}/1" for model in PROMPTS}
    with serving_models(home, tmp_path_factory.mktemp("l") / "inf.log", models) as proc:
        yield proc


def sampling(*stops: str) -> pb.SamplingParams:
    return pb.SamplingParams(max_new_tokens=MAX, stop_sequences=stops)  # temperature 0: greedy


def crossing_stop(home: Path, model: str, ids: list[int]) -> tuple[str, int]:
    """(stop, where it starts in the completion's text): the last character of one token's text and the
    first of the next one's, at the first boundary where both are printable and the pair occurs nowhere
    earlier in the text (so the completion must end exactly there)."""
    folder = ArtifactStore(home / "artifacts").resolve(f"artifact://models/tiny-{model}/1").path
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    decode = lambda part: tokenizer.decode(part, skip_special_tokens=True)  # noqa: E731 - as the server does
    text = decode(ids)
    for k in range(2, len(ids) - 1):  # a few tokens stream out before the stop
        before, through, after = decode(ids[:k]), decode(ids[:k + 1]), decode(ids[:k + 2])
        at = len(through)
        # Token k ends the text at `at` and token k+1 carries it on (no bytes waiting to join a character).
        if not (before == through[:len(before)] and len(before) < at < len(after) and text.startswith(after)):
            continue
        stop = text[at - 1:at + 1]
        if all(c.isprintable() and not c.isspace() and c != "\ufffd" for c in stop) and text.find(stop) == at - 1:
            assert not any(stop in decode([t]) for t in ids)  # no single token holds it
            return stop, at - 1
    pytest.fail(f"no usable token boundary in {text!r}")


def streamed(stub, model: str, *stops: str) -> list[pb.GenerateStreamResponse]:
    return list(stub.GenerateStream(pb.GenerateStreamRequest(model=model, text=PROMPTS[model],
                                                             sampling=sampling(*stops)), timeout=120))


@pytest.fixture(scope="module")
def cases(home, stub) -> dict[str, tuple[pb.GenerateResponse, str, int]]:
    """Per model: its unstopped greedy completion, a stop that crosses a token boundary in it, and where."""
    out = {}
    for model in PROMPTS:
        full = stub.Generate(pb.GenerateRequest(model=model, text=PROMPTS[model], sampling=sampling()))
        out[model] = (full, *crossing_stop(home, model, list(full.token_ids)))
    return out


@pytest.mark.parametrize("model", PROMPTS)
def test_a_stream_is_the_unary_completion_and_ends_before_a_stop_across_tokens(stub, cases, model):
    full, stop, at = cases[model]
    # Without a stop the chunks make the unary completion, text and ids (for T5 too: its own decode path).
    chunks = streamed(stub, model)
    assert "".join(c.text for c in chunks) == full.text
    assert [t for c in chunks for t in c.token_ids] == list(full.token_ids)
    assert chunks[-1].finish_reason == full.finish_reason != pb.FINISH_REASON_UNSPECIFIED
    # With the stop: a stream that sent the stop's first character before its last one came (nothing held
    # back), or that ended at a token, would carry it or be cut elsewhere.
    chunks = streamed(stub, model, stop)
    texts = [c.text for c in chunks]
    assert "".join(texts) == full.text[:at]
    assert all(stop not in t for t in texts) and len(chunks) > 1
    assert chunks[-1].finish_reason == pb.FINISH_REASON_STOP
    assert all(c.finish_reason == pb.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])
    assert chunks[-1].usage.completion_tokens == len([t for c in chunks for t in c.token_ids])
    # The unary path cuts the same text.
    cut = stub.Generate(pb.GenerateRequest(model=model, text=PROMPTS[model], sampling=sampling(stop)))
    assert cut.text == full.text[:at] and cut.finish_reason == pb.FINISH_REASON_STOP


@pytest.fixture(scope="module")
def openai_client(server, tmp_path_factory):
    gateway = start_gateway(server, tmp_path_factory.mktemp("l") / "gateway.log")
    try:
        with OpenAI(base_url=f"http://127.0.0.1:{gateway.port}/v1", api_key="unused", max_retries=0,
                    timeout=60) as client:
            yield client
    finally:
        gateway.stop()


def test_the_openai_stream_ends_before_a_stop_across_tokens(openai_client, cases):
    full, stop, at = cases["gpt2"]
    chunks = list(openai_client.completions.create(model="gpt2", prompt=PROMPTS["gpt2"], max_tokens=MAX,
                                                   temperature=0, stop=[stop], stream=True))
    texts = [c.choices[0].text for c in chunks]
    assert "".join(texts) == full.text[:at] and all(stop not in t for t in texts)
    # The decoder has no EOS, so "stop" here can only be the stop sequence ("length" without it).
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def kserve_request(text: str, **parameters) -> kpb.ModelInferRequest:
    params = {k: kpb.InferParameter(int64_param=v) if isinstance(v, int) else kpb.InferParameter(string_param=v)
              for k, v in parameters.items()}
    return kpb.ModelInferRequest(
        model_name="gpt2", parameters=params,
        inputs=[kpb.ModelInferRequest.InferInputTensor(name="text_input", datatype="BYTES", shape=[1])],
        raw_input_contents=[raw_bytes([text.encode()])])


def output_text(response: kpb.ModelInferResponse) -> str:
    (text,) = from_raw_bytes(response.raw_output_contents[0])
    return text.decode()


def test_kserve_stop_parameter_cuts_unary_and_streamed_text(kserve, cases):
    full, stop, at = cases["gpt2"]
    prompt = PROMPTS["gpt2"]
    # Ignored, the parameter would give the whole MAX tokens' text; both forms: one string, a JSON list.
    for form in (stop, json.dumps(["never in this text \u2603", stop])):
        assert output_text(kserve.ModelInfer(kserve_request(prompt, max_tokens=MAX, stop=form))) == full.text[:at]
    assert output_text(kserve.ModelInfer(kserve_request(prompt, max_tokens=MAX))) == full.text
    responses = list(kserve.ModelStreamInfer(iter([kserve_request(prompt, max_tokens=MAX, stop=stop)]),
                                             timeout=120))
    assert not any(r.error_message for r in responses)
    texts = [output_text(r.infer_response) for r in responses]
    assert "".join(texts) == full.text[:at] and all(stop not in t for t in texts)
    finals = [r.infer_response.parameters["triton_final_response"].bool_param for r in responses]
    assert finals[-1] and not any(finals[:-1])
