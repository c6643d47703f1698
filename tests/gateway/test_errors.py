"""Every refusal in OpenAI's error shape with its HTTP status, through the SDK's exception classes."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.gateway.conftest import CHAT, EMBED

MESSAGES = [{"role": "user", "content": "hi"}]


def _error(excinfo) -> dict:
    body = excinfo.value.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_an_unknown_model_is_404(openai_client):
    for call in (lambda: openai_client.models.retrieve("nope"),
                 lambda: openai_client.chat.completions.create(model="nope", messages=MESSAGES),
                 lambda: openai_client.completions.create(model="nope", prompt="x"),
                 lambda: openai_client.embeddings.create(model="nope", input="x")):
        with pytest.raises(openai.NotFoundError) as excinfo:
            call()
        error = _error(excinfo)
        assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "model_not_found", "model")


@pytest.mark.parametrize(("fields", "param"), [
    ({"logit_bias": {"7": 2.0}}, "logit_bias"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"messages": [{"role": "user", "content": "hi", "name": "ann"}]}, "messages[0].name"),
])
def test_fields_the_engine_lacks_are_refused_by_name(openai_client, fields, param):
    with pytest.raises(openai.BadRequestError) as excinfo:
        openai_client.chat.completions.create(**{"model": CHAT, "messages": MESSAGES, "max_tokens": 2, **fields})
    assert excinfo.value.param == param and "not supported yet" in _error(excinfo)["message"]


def test_neutral_values_of_those_fields_are_accepted(openai_client):
    reply = openai_client.chat.completions.create(model=CHAT, messages=MESSAGES, max_tokens=2, n=1,
                                                  presence_penalty=0, frequency_penalty=0, logprobs=False,
                                                  response_format={"type": "text"}, user="someone")
    assert reply.choices[0].message.content is not None


@pytest.mark.parametrize(("fields", "param"), [
    ({"temperature": 101}, "temperature"), ({"temperature": -0.1}, "temperature"), ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"), ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 10**6}, "max_tokens"),
    # 1024 is within the bounds but over the context window (1024 with the prompt): the engine's refusal.
    ({"seed": -1}, "seed"), ({"seed": 2**63}, "seed"), ({"stop": ["s"] * 17}, "stop"), ({"stop": [""]}, "stop[0]"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"), ({"messages": []}, "messages"),
    ({"messages": MESSAGES * 257}, "messages"), ({"max_tokens": 1024}, "max_tokens"),
])
def test_bad_fields_are_400_naming_the_param(openai_client, fields, param):
    body = {"model": CHAT, "messages": MESSAGES, **fields}
    with pytest.raises(openai.BadRequestError) as excinfo:
        openai_client.chat.completions.create(**body)
    error = _error(excinfo)
    assert excinfo.value.status_code == 400 and error["type"] == "invalid_request_error"
    assert excinfo.value.param == param, error


def test_non_finite_numbers_and_bad_json_are_400(base_url):
    raw = b'{"model": "chat", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'
    response = httpx.post(f"{base_url}/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"
    response = httpx.post(f"{base_url}/v1/chat/completions", content=b"{not json",
                          headers={"content-type": "application/json"})
    assert response.status_code == 400 and set(response.json()) == {"error"}
    response = httpx.post(f"{base_url}/v1/chat/completions", json={"model": CHAT})
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages"


def test_completion_and_embedding_refusals(openai_client):
    cases = [(lambda: openai_client.completions.create(model=CHAT, prompt="x", logprobs=2, echo=True), "logprobs"),
             (lambda: openai_client.completions.create(model=CHAT, prompt="x", best_of=3), "best_of"),
             (lambda: openai_client.completions.create(model=CHAT, prompt=[1, 2], echo=True), "echo"),
             (lambda: openai_client.completions.create(model=CHAT, prompt="x", max_tokens=2000), "max_tokens"),
             (lambda: openai_client.embeddings.create(model=EMBED, input=[1, 2, 3]), "input"),
             (lambda: openai_client.embeddings.create(model=EMBED, input="x", dimensions=7), "dimensions"),
             (lambda: openai_client.embeddings.create(model=EMBED, input="x", encoding_format="int8"),
              "encoding_format")]
    for call, param in cases:
        with pytest.raises(openai.BadRequestError) as excinfo:
            call()
        assert excinfo.value.param == param, _error(excinfo)


def test_a_body_over_the_cap_is_413(base_url):
    big = {"model": CHAT, "messages": [{"role": "user", "content": "x" * (5 << 20)}]}
    response = httpx.post(f"{base_url}/v1/chat/completions", json=big)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


def test_metrics_count_requests_by_route_and_status(base_url, openai_client):
    with pytest.raises(openai.NotFoundError):
        openai_client.models.retrieve("nope")
    text = httpx.get(f"{base_url}/metrics").text
    assert 'fastserve_gateway_requests_total{route="/v1/models/{model_id:path}",status="404"}' in text
    assert "fastserve_gateway_request_seconds_bucket" in text


def test_the_request_id_comes_back(base_url):
    response = httpx.get(f"{base_url}/v1/models", headers={"x-request-id": "abc123"})
    assert response.headers["x-request-id"] == "abc123"
    assert len(httpx.get(f"{base_url}/v1/models").headers["x-request-id"]) == 16


def test_the_request_id_reaches_the_inference_service(base_url, inference):
    """The id of the HTTP request tags the inference service's log line of the refused call."""
    body = {"model": CHAT, "messages": MESSAGES, "max_tokens": 1024}
    response = httpx.post(f"{base_url}/v1/chat/completions", json=body, headers={"x-request-id": "gw-rid-0042"})
    assert response.status_code == 400
    assert "gw-rid-0042" in inference.log_text()
