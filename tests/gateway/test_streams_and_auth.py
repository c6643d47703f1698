"""A client that leaves mid-stream frees its slot; overload is 429 with Retry-After; the bearer token."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest
from openai import OpenAI

from fastserve.client import sampling_params
from fastserve.inference.v1 import inference_pb2 as pb
from tests.gateway.conftest import BUSY, CHAT, TOKEN, generated_tokens

LONG = 1000  # with the one-token prompt, within the model's 1024-token window
PROMPT = [5]


def test_a_disconnect_frees_the_slot(base_url, openai_client, grpc_client, metrics_port):
    # The control: this prompt runs to its whole length, so a generation that stops early was cancelled.
    whole = grpc_client.generate(BUSY, PROMPT, sampling_params(max_new_tokens=LONG))
    assert whole.finish_reason == pb.FINISH_REASON_LENGTH and whole.usage.completion_tokens == LONG
    before = generated_tokens(metrics_port)
    body = {"model": BUSY, "prompt": PROMPT, "max_tokens": LONG, "stream": True}
    queued: list = []
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        # The model's one slot is taken; a second request fills its queue of one; a third is overload.
        waiter = threading.Thread(target=lambda: queued.append(
            grpc_client.generate(BUSY, PROMPT, sampling_params(max_new_tokens=2))))
        waiter.start()
        time.sleep(0.5)
        with pytest.raises(openai.RateLimitError) as excinfo:
            openai_client.completions.create(model=BUSY, prompt="x", max_tokens=2)
        assert excinfo.value.response.headers["retry-after"].isdigit()
        assert excinfo.value.response.json()["error"]["type"] == "rate_limit_error"
        assert not queued
    # The client has gone: the queued request gets the slot within moments, the generation cut short.
    waiter.join(timeout=5)
    assert queued and queued[0].usage.completion_tokens == 2
    spent = generated_tokens(metrics_port) - before
    assert 3 <= spent < LONG
    time.sleep(0.3)
    assert generated_tokens(metrics_port) - before == spent


def test_auth_on(secured_gateway):
    url = f"http://127.0.0.1:{secured_gateway.port}"
    for key in ("wrong", TOKEN + "x"):
        with OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0) as client:
            with pytest.raises(openai.AuthenticationError) as excinfo:
                client.models.list()
            assert excinfo.value.response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert httpx.post(f"{url}/v1/chat/completions", json={}).status_code == 401
    assert httpx.get(f"{url}/health").status_code == 200
    with OpenAI(base_url=f"{url}/v1", api_key=TOKEN, max_retries=0) as client:
        assert CHAT in [m.id for m in client.models.list().data]
        reply = client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert reply.usage.completion_tokens >= 1


def test_auth_off_takes_any_key(base_url):
    assert httpx.get(f"{base_url}/v1/models").status_code == 200
    assert httpx.get(f"{base_url}/v1/models", headers={"authorization": "Bearer anything"}).status_code == 200
