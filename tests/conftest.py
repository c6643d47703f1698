"""Fixtures that start real components: the tests' own redis-server on a free port (never the
machine's 6379), service processes, Celery workers. All are torn down after."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from fastserve.runtime.config import Config
from fastserve.runtime.redis_server import RedisServer
from fastserve.runtime.stores import Stores
from tests.support.processes import free_port, start_redis


def pytest_configure(config) -> None:
    # A suite started in the background (`make test &`, nohup) inherits an ignored SIGINT, and every child
    # it starts would too (an ignored signal survives exec): the tests that press Ctrl-C on a child need it
    # to arrive, as it does from a terminal.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


def private_env(home: Path, redis_url: str) -> dict[str, str]:
    """Environment of a private FastServe: its own home, the tests' Redis (emptied), no metrics ports."""
    Stores.from_config(Config.from_env({"FASTSERVE_REDIS_URL": redis_url})).jobs.redis.flushdb()
    return {
        "FASTSERVE_HOME": str(home),
        "FASTSERVE_REDIS_URL": redis_url,
        "FASTSERVE_PREPROCESSING_METRICS_PORT": "0",
        "FASTSERVE_TRAINING_METRICS_PORT": "0",
        "FASTSERVE_OPTIMIZATION_METRICS_PORT": "0",
        "FASTSERVE_INFERENCE_METRICS_PORT": "0",
        "FASTSERVE_GRACE_SECONDS": "5",
        "FASTSERVE_GATEWAY_PORT": str(free_port()),  # a stack's fifth process: never the shared default 8000
    }


@pytest.fixture
def env(tmp_path: Path, redis_server: RedisServer) -> dict[str, str]:
    return private_env(tmp_path / "home", redis_server.url)


@pytest.fixture
def config(env: dict[str, str]) -> Config:
    return Config.from_env(env)


@pytest.fixture
def stores(config: Config) -> Stores:
    return Stores.from_config(config)


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    path = tmp_path / "logs"
    path.mkdir()
    return path


@pytest.fixture(scope="session")
def tiny_gpt(tmp_path_factory) -> Path:
    """A small GPT-2 at random weights with its BPE tokenizer: a generation model that loads in a moment."""
    # Imported here so that torch and transformers load only in sessions that ask for a model.
    from tests.support.tiny_models import build_causal_lm

    return build_causal_lm(tmp_path_factory.mktemp("tiny-gpt") / "model", train_steps=0, documents=300, vocab=300)


@pytest.fixture(scope="module")
def gpt_server(tmp_path_factory, tiny_gpt):
    """An inference server process: MiniLM served by default, `tiny-gpt` published in its store to load."""
    import shutil

    from fastserve.storage.artifacts import ArtifactStore
    from tests.support.processes import start_inference

    home = tmp_path_factory.mktemp("gpt-server") / "home"
    with ArtifactStore(home / "artifacts").publish("models", "tiny-gpt") as draft:
        for item in tiny_gpt.iterdir():
            shutil.copy(item, draft.path / item.name)
    proc = start_inference(home, tmp_path_factory.mktemp("l") / "inf.log")
    yield proc
    proc.stop()
