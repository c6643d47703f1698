"""The dashboard in a real headless browser (Debian's chromium, driven by Playwright) over a real stack: the
tests' Redis, the three job services with a Celery worker, an inference service serving a tiny chat model,
and the gateway with a bearer token. One home for all, so the registry the dashboard reads holds what the
jobs published (a corpus, a tokenizer, a dataset, a model and its optimized copy: a lineage with edges)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from playwright.sync_api import Page, sync_playwright

from fastserve.client import FastServeClient
from fastserve.client.specs import corpus_source
from fastserve.common.v1 import jobs_pb2
from fastserve.runtime.config import JOB_SERVICES
from fastserve.storage.artifacts import ArtifactStore
from tests.conftest import private_env
from tests.gateway.conftest import build_chat_model
from tests.support.processes import Proc, free_port, start_gateway, start_inference, start_service, start_worker

CHROMIUM = Path("/usr/bin/chromium")
TOKEN = "dashboard-secret"
CHAT = "chat"
DESKTOP = {"width": 1280, "height": 800}
# The bound of every wait on the page (Playwright waits on conditions; nothing here sleeps for one).
WAIT_MS = 30_000
# The GPT every training job here trains: small enough to run many steps a second on a 2-core machine.
GPT = {"family": "gpt2", "num_layers": 1, "hidden_size": 32, "num_heads": 2, "max_position_embeddings": 64}


@pytest.fixture(scope="package")
def logs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ui-logs")


@pytest.fixture(scope="package")
def stack_env(tmp_path_factory, redis_server) -> dict[str, str]:
    return {**private_env(tmp_path_factory.mktemp("ui") / "home", redis_server.url), "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="package")
def inference_metrics_port() -> int:
    return free_port()


def _serve_chat(stack_env: dict[str, str], logs: Path, metrics_port: int) -> Proc:
    """The inference service in the stack's home, serving a random-weight ChatML GPT-2 as `chat`."""
    home = Path(stack_env["FASTSERVE_HOME"])
    with ArtifactStore(home / "artifacts").publish("models", CHAT) as draft:
        build_chat_model(draft.path)
    proc = start_inference(home, logs / "inference.log", FASTSERVE_REDIS_URL=stack_env["FASTSERVE_REDIS_URL"],
                           FASTSERVE_INFERENCE_MODELS="none", FASTSERVE_INFERENCE_METRICS_PORT=str(metrics_port))
    try:
        with FastServeClient(ports={"inference": proc.port}) as fs:
            fs.inference.load_model(CHAT, f"artifact://models/{CHAT}/1")
    except BaseException:
        proc.stop()
        raise
    return proc


@pytest.fixture(scope="package")
def stack(stack_env, logs, inference_metrics_port) -> dict[str, Proc]:
    """Preprocessing, training, optimization, one Celery worker for their three queues, and inference, all
    started at once (most of a start is imports, and they overlap well)."""
    starts = {service: (start_service, service, stack_env, logs) for service in JOB_SERVICES}
    starts["worker"] = (start_worker, stack_env, logs)
    starts["inference"] = (_serve_chat, stack_env, logs, inference_metrics_port)
    procs: dict[str, Proc] = {}
    try:
        with ThreadPoolExecutor(len(starts)) as pool:
            futures = {name: pool.submit(*start) for name, start in starts.items()}
            failures = []
            for name, future in futures.items():
                try:
                    procs[name] = future.result()
                except Exception as error:  # noqa: BLE001 - every start is waited for, so none is left running
                    failures.append(f"{name}: {error}")
        assert not failures, "the stack did not start:\n" + "\n".join(failures)
        yield procs
    finally:
        with ThreadPoolExecutor(max(1, len(procs))) as pool:  # each stop waits out its own grace
            list(pool.map(Proc.stop, procs.values()))


@pytest.fixture(scope="package")
def job_services(stack) -> dict[str, Proc]:
    return {service: stack[service] for service in JOB_SERVICES}


@pytest.fixture(scope="package")
def inference(stack) -> Proc:
    return stack["inference"]


def gateway_settings(stack_env: dict[str, str], ports: dict[str, int], metrics_port: int) -> dict[str, str]:
    """What the gateway reads to reach every service; its own port is start_gateway's to choose."""
    settings = {k: v for k, v in stack_env.items() if k != "FASTSERVE_GATEWAY_PORT"}
    settings.update({f"FASTSERVE_{service.upper()}_PORT": str(port) for service, port in ports.items()})
    settings.update({f"FASTSERVE_{service.upper()}_HOST": "127.0.0.1" for service in ports})
    settings["FASTSERVE_INFERENCE_METRICS_PORT"] = str(metrics_port)
    return settings


@pytest.fixture(scope="package")
def gateway(stack_env, logs, job_services, inference, inference_metrics_port) -> Proc:
    ports = {**{name: proc.port for name, proc in job_services.items()}, "inference": inference.port}
    proc = start_gateway(inference, logs / "gateway.log", TOKEN,
                         **gateway_settings(stack_env, ports, inference_metrics_port))
    yield proc
    proc.stop()


@pytest.fixture(scope="package")
def base_url(gateway) -> str:
    return f"http://127.0.0.1:{gateway.port}"


@pytest.fixture(scope="package")
def gateway_without_inference(stack_env, logs, job_services) -> str:
    """A second gateway whose inference address answers nothing (the job services are the real ones): the
    URL of its dashboard. Its /health is 503 by design, so it is ready once /ui answers."""
    ports = {**{name: proc.port for name, proc in job_services.items()}, "inference": free_port()}
    proc = start_gateway(None, logs / "gateway-dead.log", TOKEN, ready_path="/ui",
                         **gateway_settings(stack_env, ports, free_port()))
    yield f"http://127.0.0.1:{proc.port}"
    proc.stop()


@pytest.fixture(scope="package")
def fs(job_services, inference):
    ports = {**{name: proc.port for name, proc in job_services.items()}, "inference": inference.port}
    with FastServeClient(ports=ports) as client:
        yield client


def _succeeded(client, job, timeout: float = 180.0):
    done = client.wait_job(job.job_id, timeout=timeout)
    assert done.state == jobs_pb2.JOB_STATE_SUCCEEDED, f"{job.job_type} {job.job_id}: {done.state} {done.error}"
    return done


@pytest.fixture(scope="package")
def pipeline(fs) -> dict[str, str]:
    """Corpus → tokenizer → dataset → model → its int8 copy, each by a real job on the real worker: the
    registry's lineage has an edge at each arrow. Returns the URIs by kind."""
    pre = fs.preprocessing
    source = corpus_source("stdlib-docstrings", max_documents=800)
    corpus = _succeeded(pre, pre.submit_clean_job(source, ["collapse_whitespace", "length_filter,min_chars=20"],
                                                  "stdlib-ui")).result["corpus_uri"]
    tokenizer = _succeeded(pre, pre.train_tokenizer(corpus, "bpe-ui", vocab_size=400)).result["tokenizer_uri"]
    dataset = _succeeded(pre, pre.build_dataset(corpus, tokenizer, "clm-ui", max_length=64)).result["dataset_uri"]
    model = _succeeded(fs.training, fs.training.submit_training_job(
        dataset_uri=dataset, tokenizer_uri=tokenizer, output_name="gpt-ui", model=training_arch(fs),
        hyperparameters={"max_steps": 20, "log_interval_steps": 5, "batch_size": 8, "eval_interval_steps": 10},
    )).result["model_uri"]
    opt = fs.optimization
    optimized = _succeeded(opt, opt.submit_optimization_job(model, ["quantize:int8_dynamic"], output_name="gpt-ui-int8",
                                                            force_promote=True), timeout=300)
    return {"corpus": corpus, "tokenizer": tokenizer, "dataset": dataset, "model": model,
            "optimized": opt.get_report(optimized.job_id).result.uri, "optimization_job": optimized.job_id}


def training_arch(fs):
    pb = fs.training.pb
    return pb.ArchitectureConfig(family=pb.ARCHITECTURE_FAMILY_GPT2, num_layers=GPT["num_layers"],
                                 hidden_size=GPT["hidden_size"], num_heads=GPT["num_heads"],
                                 max_position_embeddings=GPT["max_position_embeddings"])


# The browser.

@pytest.fixture(scope="package")
def browser():
    # Debian's chromium, which `make browser` installs; Playwright never downloads one here. Missing, it is
    # an error, never a skip: a suite that skipped its browser tests would pass without testing the dashboard.
    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: `make browser` installs Debian's chromium"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield browser
        browser.close()


class ConsoleErrors:
    """Every console error and uncaught exception of a page; a test that provokes an HTTP error on purpose
    (a wrong token, a service down) names its status, and the browser's own "Failed to load resource" line
    for that status is then expected, not an error."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.expected_statuses: set[int] = set()

    def console(self, message) -> None:
        if message.type == "error" and not self._expected(message.text):
            self.errors.append(f"console.error at {message.location.get('url', '')}: {message.text}")

    def page_error(self, error) -> None:
        self.errors.append(f"uncaught {error.name}: {error.message}\n{error.stack}")

    def _expected(self, text: str) -> bool:
        return any(f"status of {status} " in text for status in self.expected_statuses) and \
            text.startswith("Failed to load resource")


def open_page(browser, base_url: str, errors: ConsoleErrors, *, token: str | None = TOKEN,
              viewport: dict | None = None) -> Page:
    """A page in a new browser context (a new browser session); with `token`, one that was entered
    earlier in this session (in sessionStorage, where the dashboard keeps it)."""
    context = browser.new_context(viewport=viewport or DESKTOP, base_url=base_url)
    context.set_default_timeout(WAIT_MS)
    if token is not None:
        context.add_init_script(f"window.sessionStorage.setItem('fastserve-token', {token!r});")
    page = context.new_page()
    page.on("console", errors.console)
    page.on("pageerror", errors.page_error)
    return page


@pytest.fixture
def console_errors():
    errors = ConsoleErrors()
    yield errors
    assert not errors.errors, "the page logged errors:\n" + "\n".join(errors.errors)


@pytest.fixture
def page(browser, base_url, console_errors):
    """The dashboard at 1280×800, the token entered; the test fails on any console error or page error."""
    page = open_page(browser, base_url, console_errors)
    yield page
    page.context.close()


@pytest.fixture
def new_page(browser, console_errors):
    """Pages of other kinds (no token yet, another gateway, another viewport), closed after the test and
    checked for console errors like `page`."""
    pages: list[Page] = []

    def make(url: str, **options) -> Page:
        pages.append(open_page(browser, url, console_errors, **options))
        return pages[-1]
    yield make
    for p in pages:
        p.context.close()


@pytest.fixture(scope="package")
def screenshots() -> Path | None:
    """The folder FASTSERVE_SCREENSHOTS names (`make screenshots`: docs/ui), or None: no screenshots."""
    folder = os.environ.get("FASTSERVE_SCREENSHOTS", "")
    if not folder:
        return None
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def shoot(screenshots):
    """`shoot(page, "jobs")` saves docs/ui/jobs.png at 1280×800 when screenshots are asked for."""
    def take(page: Page, name: str) -> None:
        if screenshots is not None:
            page.set_viewport_size(DESKTOP)
            page.screenshot(path=str(screenshots / f"{name}.png"))
    return take
