"""An inference server (MiniLM, a random-weight chat GPT-2, the same GPT-2 with one KV slot and a queue of one)
and two gateway processes over it, one with a bearer token."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from fastserve.client import FastServeClient
from fastserve.corpora.stdlib import stdlib_documents
from fastserve.inference.v1 import inference_pb2 as pb
from fastserve.services.gateway.dashboard.metrics_scrape import GENERATED_TOKENS
from fastserve.services.preprocessing.tokenizer_training import TokenizerSpec, save_tokenizer, train_tokenizer
from fastserve.storage.artifacts import ArtifactStore
from tests.support.chatml import CHATML, EOS, IM_END, IM_START
from tests.support.metrics import metric
from tests.support.processes import free_port, start_gateway, start_inference

CHAT, BUSY, EMBED = "chat", "busy", "all-MiniLM-L6-v2"
TOKEN = "gateway-secret"
WINDOW = 1024


def generated_tokens(metrics_port: int) -> float:
    """Tokens the one-slot model BUSY has generated since the inference server started."""
    return metric(metrics_port, GENERATED_TOKENS, model=f"{BUSY}/1")


def build_chat_model(folder: Path) -> None:
    """A GPT-2 at random weights with ChatML's specials and template, and a long window so that a
    generation can be interrupted before it ends."""
    torch.manual_seed(0)
    texts = [d["text"] for d in stdlib_documents(seed=0, max_documents=300)]
    spec = TokenizerSpec("bpe", 300, special_tokens=(IM_START, IM_END))
    tokenizer = train_tokenizer(spec, iter(texts), length=len(texts))
    eos, pad = tokenizer.token_to_id(EOS), tokenizer.token_to_id("<pad>")
    save_tokenizer(tokenizer, spec, folder)
    fast = PreTrainedTokenizerFast.from_pretrained(str(folder))
    fast.chat_template = CHATML
    fast.save_pretrained(str(folder))
    config = GPT2Config(vocab_size=tokenizer.get_vocab_size(), n_positions=WINDOW, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=eos, eos_token_id=eos, pad_token_id=pad)
    GPT2LMHeadModel(config).eval().save_pretrained(str(folder))


@pytest.fixture(scope="package")
def metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="package")
def inference(tmp_path_factory, metrics_port):
    home = tmp_path_factory.mktemp("gateway") / "home"
    with ArtifactStore(home / "artifacts").publish("models", CHAT) as draft:
        build_chat_model(draft.path)
    proc = start_inference(home, tmp_path_factory.mktemp("l") / "inf.log",
                           FASTSERVE_INFERENCE_METRICS_PORT=str(metrics_port))
    with FastServeClient(ports={"inference": proc.port}) as fs:
        fs.inference.load_model(CHAT, f"artifact://models/{CHAT}/1")
        one_slot = pb.ModelConfig(batching=pb.BatchingConfig(enabled=True, max_batch_size=1, max_queue_size=1),
                                  generation=pb.GenerationConfig(kv_slots=1, host_slots=0))
        fs.inference.load_model(BUSY, f"artifact://models/{CHAT}/1", config=one_slot)
    yield proc
    proc.stop()


@pytest.fixture(scope="package")
def grpc_client(inference):
    with FastServeClient(ports={"inference": inference.port}) as fs:
        yield fs.inference


@pytest.fixture(scope="package")
def gateway(inference, tmp_path_factory):
    proc = start_gateway(inference, tmp_path_factory.mktemp("l") / "gateway.log")
    yield proc
    proc.stop()


@pytest.fixture(scope="package")
def secured_gateway(inference, tmp_path_factory):
    proc = start_gateway(inference, tmp_path_factory.mktemp("l") / "gateway-auth.log", TOKEN)
    yield proc
    proc.stop()


@pytest.fixture(scope="package")
def base_url(gateway) -> str:
    return f"http://127.0.0.1:{gateway.port}"


@pytest.fixture(scope="package")
def openai_client(base_url):
    from openai import OpenAI

    with OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=60) as client:
        yield client
