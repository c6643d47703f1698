"""With no Redis configured and none at the default address, a real embedded redis-server starts."""

import redis

from fastserve.runtime.redis_server import answers, resolve_redis_url
from tests.support.processes import free_port


def test_configured_url_wins(tmp_path, redis_server):
    url, started = resolve_redis_url(redis_server.url, tmp_path, free_port(), default_url="redis://127.0.0.1:1/0")
    assert (url, started) == (redis_server.url, None)


def test_embedded_redis_starts_when_none_answers(tmp_path):
    dead_default = f"redis://127.0.0.1:{free_port()}/0"
    assert not answers(dead_default)
    url, started = resolve_redis_url("", tmp_path, free_port(), default_url=dead_default)
    try:
        assert started is not None and url == started.url
        client = redis.Redis.from_url(url)
        client.set("k", "v")
        assert client.get("k") == b"v"
        assert (tmp_path / "redis" / "redis.log").exists()
        # A second resolution finds the running embedded server instead of starting another.
        again, second = resolve_redis_url("", tmp_path, started.port, default_url=dead_default)
        assert again == url and second is None
    finally:
        if started:
            started.stop()
    assert not answers(url)
