"""The dashboard as a person uses it, in headless chromium over the real stack of conftest.py: the token
asked once, every page, a training curve that grows while the job runs, cancel with its confirmation, a
streamed chat reply, a service down, the keyboard alone and a phone-sized window. Every test fails on any
console error or uncaught exception of its pages."""

from __future__ import annotations

import re
import threading

import httpx
import pytest
from playwright.sync_api import Page, expect

from fastserve.client.jobs import TERMINAL
from tests.ui.conftest import CHAT, TOKEN, training_arch

PAGES = ("jobs", "models", "artifacts", "playground")
PHONE = {"width": 390, "height": 844}
# A reply long enough to be read twice while it streams: greedy decoding of the random-weight model
# repeats tokens rather than ending (the model's window is 1024).
REPLY_TOKENS = 600
# What has the keyboard focus: a nav link, a jobs row (its job id), and whether it shows it.
FOCUSED = """() => {
  const el = document.activeElement, style = getComputedStyle(el);
  return {nav: el.matches('nav a'), row: el.matches('#jobs-table tbody tr[data-job-id]') ? el.dataset.jobId : null,
          outline: style.outlineStyle !== 'none' || style.boxShadow !== 'none'};
}"""


def points(page: Page, chart: str) -> int:
    return int(page.locator(chart).get_attribute("data-points") or 0)


def wait_points_above(page: Page, chart: str, count: int) -> int:
    page.wait_for_function("([sel, n]) => Number(document.querySelector(sel)?.dataset.points || 0) > n",
                           arg=[chart, count])
    return points(page, chart)


def open_route(page: Page, route: str) -> None:
    page.goto(f"/ui#/{route}")
    expect(page.locator(f'nav a[href="#/{route}"]')).to_have_attribute("aria-current", "page")


@pytest.fixture(scope="module")
def long_job(fs, pipeline) -> str:
    """A training job that runs until cancelled, a loss point every 2 steps and an evaluation every 20."""
    job = fs.training.submit_training_job(
        dataset_uri=pipeline["dataset"], tokenizer_uri=pipeline["tokenizer"], output_name="gpt-ui-long",
        model=training_arch(fs), hyperparameters={"max_steps": 100000, "log_interval_steps": 2, "batch_size": 8,
                                                  "eval_interval_steps": 20, "warmup_steps": 10})
    yield job.job_id
    if fs.training.get_job(job.job_id).state not in TERMINAL:  # a test failed before cancelling it
        fs.training.cancel_job(job.job_id, "test teardown")


def test_the_token_is_asked_once_and_then_sent_with_every_call(new_page, base_url, console_errors, pipeline):
    console_errors.expected_statuses.add(401)  # the calls that find no token, or a wrong one
    page = new_page(base_url, token=None)
    calls: list[tuple[str, str | None]] = []
    page.on("request", lambda r: calls.append((r.url, r.headers.get("authorization")))
            if "/ui/api/" in r.url else None)
    page.goto("/ui")
    dialog, error = page.locator("#token-dialog"), page.locator("#token-error")
    expect(dialog).to_be_visible()
    expect(error).to_be_hidden()
    assert calls and calls[0][1] is None

    page.fill("#token-input", "not-the-token")
    page.click("#token-submit")
    expect(error).to_be_visible()  # refused: the dialog is open again, saying so
    expect(dialog).to_be_visible()

    before = len(calls)
    page.fill("#token-input", TOKEN)
    page.click("#token-submit")
    expect(dialog).to_be_hidden()
    expect(page.locator("#jobs-table tbody tr[data-job-id]").first).to_be_visible()
    open_route(page, "models")
    expect(page.locator(f'#models-table tbody tr[data-model="{CHAT}"]')).to_be_visible()
    after = calls[before:]
    assert {"/ui/api/jobs", "/ui/api/models"} <= {httpx.URL(url).path for url, _ in after}
    assert all(auth == f"Bearer {TOKEN}" for _, auth in after), after
    assert page.evaluate("sessionStorage.getItem('fastserve-token')") == TOKEN
    expect(dialog).to_be_hidden()  # asked once: the next page did not ask again


def test_every_page_loads_with_its_content(page, pipeline):
    open_route(page, "jobs")
    rows = page.locator("#jobs-table tbody tr[data-job-id]")
    expect(rows.first).to_be_visible()
    services = rows.evaluate_all("rows => rows.map(r => r.dataset.service)")
    assert {"preprocessing", "training", "optimization"} <= set(services)
    page.select_option("#filter-kind", "preprocessing")
    expect(page.locator('#jobs-table tbody tr:not([data-service="preprocessing"])')).to_have_count(0)
    expect(page.locator('#jobs-table tbody tr[data-service="preprocessing"]')).to_have_count(3)
    page.select_option("#filter-kind", "")

    page.goto(f"/ui#/jobs/optimization/{pipeline['optimization_job']}")
    expect(page.locator("#job-state")).to_have_text("SUCCEEDED")
    expect(page.locator("#job-report tbody tr").first).to_be_visible()
    expect(page.locator("#cancel-job")).to_be_hidden()

    open_route(page, "models")
    row = page.locator(f'#models-table tbody tr[data-model="{CHAT}"]')
    expect(row.locator(".model-state")).to_have_text(re.compile("^READY"))
    expect(row.locator("button.unload")).to_be_visible()

    open_route(page, "artifacts")
    expect(page.locator(f'#artifacts-table tbody tr[data-uri="{pipeline["model"]}"]')).to_be_visible()
    page.select_option("#artifact-kind", "tokenizers")
    expect(page.locator("#artifacts-table tbody tr")).to_have_count(1)

    open_route(page, "playground")
    expect(page.locator(f'#pg-model option[value="{CHAT}"]')).to_have_count(1)
    for field in ("#pg-temperature", "#pg-top-p", "#pg-max-tokens", "#pg-system", "#pg-input"):
        expect(page.locator(f'label[for="{field[1:]}"]')).to_have_count(1)
    expect(page.locator(".error-state")).to_have_count(0)


def test_the_loss_curve_gains_points_while_the_job_runs(page, long_job, shoot, screenshots):
    page.goto(f"/ui#/jobs/training/{long_job}")
    state = page.locator("#job-state")
    expect(state).to_have_text("RUNNING", timeout=60_000)
    first = wait_points_above(page, "#loss-chart", 1)
    expect(state).to_have_text("RUNNING")
    second = wait_points_above(page, "#loss-chart", first)
    expect(state).to_have_text("RUNNING")
    assert second > first >= 2
    assert points(page, "#lr-chart") >= 1
    expect(page.locator("#job-tps")).to_have_text(re.compile(r"\d"))
    expect(page.locator("#job-progress")).to_be_visible()
    if screenshots is not None:  # a curve with some shape to it, and an evaluation point
        wait_points_above(page, "#loss-chart", 12)
        wait_points_above(page, "#eval-chart", 0)
        shoot(page, "jobs")


def test_cancel_asks_first_and_keep_it_keeps_it_running(page, fs, long_job):
    page.goto(f"/ui#/jobs/training/{long_job}")
    expect(page.locator("#job-state")).to_have_text("RUNNING", timeout=60_000)
    confirm = page.locator("#confirm-dialog")
    page.click("#cancel-job")
    expect(confirm).to_be_visible()
    page.click("#confirm-no")
    expect(confirm).to_be_hidden()
    seen = points(page, "#loss-chart")
    wait_points_above(page, "#loss-chart", seen)  # still training after "keep it"
    expect(page.locator("#job-state")).to_have_text("RUNNING")
    assert fs.training.get_job(long_job).cancel_requested is False

    page.click("#cancel-job")
    expect(confirm).to_be_visible()
    page.click("#confirm-yes")
    expect(confirm).to_be_hidden()
    expect(page.locator("#job-state")).to_have_text("CANCELLED", timeout=60_000)
    expect(page.locator("#cancel-job")).to_be_hidden()
    open_route(page, "jobs")
    expect(page.locator(f'#jobs-table tbody tr[data-job-id="{long_job}"] .job-state')).to_have_text("CANCELLED")


@pytest.fixture
def chat_traffic(base_url):
    """Chat completions sent one after another while the test runs, so that the figures move."""
    stop = threading.Event()

    def send() -> None:
        with httpx.Client(base_url=base_url, headers={"authorization": f"Bearer {TOKEN}"}, timeout=60) as client:
            while not stop.is_set():
                client.post("/v1/chat/completions", json={"model": CHAT, "max_tokens": 24, "temperature": 0.8,
                                                          "messages": [{"role": "user", "content": "Hello"}]})
    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join(timeout=60)


def test_the_models_page_shows_live_figures(page, chat_traffic, shoot):
    open_route(page, "models")
    row = page.locator(f'#models-table tbody tr[data-model="{CHAT}"]')
    expect(row.locator(".model-state")).to_have_text(re.compile("^READY"))
    # Figures are rates and quantiles between two scrapes: they appear from the second refresh on.
    for cell in (".fig-p50", ".fig-p99", ".fig-ttft"):
        expect(row.locator(cell)).to_have_text(re.compile(r"\d"), timeout=20_000)
    # Tokens are flowing: a rate above zero, not merely a number.
    page.wait_for_function("sel => parseFloat(document.querySelector(sel)?.textContent) > 0",
                           arg=f'#models-table tbody tr[data-model="{CHAT}"] .fig-tps', timeout=20_000)
    expect(row.locator(".fig-occupancy")).to_have_text(re.compile(r"\d+%"))
    shoot(page, "models")


def test_the_lineage_graph_runs_from_the_corpus_to_the_optimized_model(page, pipeline, shoot):
    open_route(page, "artifacts")
    page.locator(f'#artifacts-table tbody tr[data-uri="{pipeline["optimized"]}"]').click()
    graph = page.locator("#lineage svg")
    for kind in ("corpus", "tokenizer", "dataset", "model", "optimized"):
        expect(graph.locator(f'g.node[data-uri="{pipeline[kind]}"]')).to_have_count(1)
    # int8 ← model ← dataset ← tokenizer and corpus; tokenizer ← corpus.
    assert graph.locator("path.edge").count() >= 5
    # Layered left to right: a corpus left of its tokenizer, left of the dataset, the model, its int8 copy.
    xs = [graph.locator(f'g.node[data-uri="{pipeline[kind]}"]').bounding_box()["x"]
          for kind in ("corpus", "tokenizer", "dataset", "model")]
    assert xs == sorted(xs) and xs[0] < xs[-1], xs
    shoot(page, "artifacts")


def test_the_playground_streams_a_reply(page, shoot, screenshots):
    open_route(page, "playground")
    expect(page.locator(f'#pg-model option[value="{CHAT}"]')).to_have_count(1)
    page.select_option("#pg-model", CHAT)
    page.fill("#pg-temperature", "0")
    page.fill("#pg-max-tokens", str(REPLY_TOKENS))
    page.fill("#pg-system", "You are a small random model.")
    page.fill("#pg-input", "Tell me about the standard library.")
    messages = page.locator("#pg-messages")
    page.click("#pg-send")
    expect(messages).to_have_attribute("data-streaming", "true")
    expect(messages.locator(".msg.user")).to_have_text(re.compile("standard library"))
    reply = "#pg-messages .msg.assistant .text"
    grow = "([sel, n]) => (document.querySelector(sel)?.textContent.length || 0) > n"
    page.wait_for_function(grow, arg=[reply, 0], polling="raf")
    first = len(page.locator(reply).text_content())
    assert messages.get_attribute("data-streaming") == "true"
    page.wait_for_function(grow, arg=[reply, first], polling="raf")
    second = len(page.locator(reply).text_content())
    assert second > first > 0
    expect(messages).to_have_attribute("data-streaming", "false", timeout=60_000)
    assert len(page.locator(reply).text_content()) >= second
    expect(page.locator("#pg-send")).to_be_enabled()
    expect(page.locator(".error-state")).to_have_count(0)
    if screenshots is not None:  # a sampled reply reads better than the greedy one's repeated bytes
        page.click("#pg-clear")
        page.fill("#pg-temperature", "1")
        page.fill("#pg-max-tokens", "40")
        page.fill("#pg-input", "What does the os module do?")
        page.click("#pg-send")
        expect(messages.locator(".msg.assistant")).to_have_count(1)
        expect(messages).to_have_attribute("data-streaming", "false")
        page.locator("#pg-input").blur()
        shoot(page, "playground")


def test_the_keyboard_alone_reaches_the_nav_and_opens_a_job(page, pipeline):
    open_route(page, "jobs")
    expect(page.locator("#jobs-table tbody tr[data-job-id]").first).to_be_visible()
    reached_nav, row = False, None
    for _ in range(60):
        page.keyboard.press("Tab")
        focused = page.evaluate(FOCUSED)
        reached_nav = reached_nav or focused["nav"]
        if focused["row"]:
            row = focused["row"]
            assert focused["outline"], "a focused row shows no focus"
            break
    assert reached_nav and row, "Tab never reached the nav and then a jobs row"
    page.keyboard.press("Enter")
    expect(page.locator("#job-detail")).to_have_attribute("data-job-id", row)
    expect(page.locator("#job-state")).to_have_text(re.compile("[A-Z]+"))


def test_a_phone_sized_window_has_no_horizontal_page_scroll(new_page, base_url, pipeline):
    page = new_page(base_url, viewport=PHONE)
    content = {"jobs": "#jobs-table tbody tr", "models": "#models-table tbody tr",
               "artifacts": "#artifacts-table tbody tr", "playground": f'#pg-model option[value="{CHAT}"]'}
    for route in PAGES:
        open_route(page, route)
        expect(page.locator(content[route]).first).to_be_attached()
        width = page.evaluate("[document.scrollingElement.scrollWidth, window.innerWidth]")
        assert width[0] <= width[1] + 1, f"#/{route} is {width[0]} px wide in a {width[1]} px window"


def test_a_service_down_shows_on_the_pages_that_need_it(new_page, gateway_without_inference, console_errors,
                                                        pipeline):
    console_errors.expected_statuses.add(503)  # the calls that need inference
    page = new_page(gateway_without_inference)
    open_route(page, "models")
    expect(page.locator("#page .error-state")).to_contain_text("inference")
    expect(page.locator('#service-status li[data-service="inference"]')).to_have_attribute(
        "data-status", re.compile("^(NOT_SERVING|UNREACHABLE)$"))
    expect(page.locator('#service-status li[data-service="training"]')).to_have_attribute("data-status", "SERVING")
    open_route(page, "playground")
    expect(page.locator("#page .error-state")).to_contain_text(re.compile("inference|unavailable", re.I))
    open_route(page, "jobs")  # the job services are up: their jobs are listed, and nothing is wrong
    expect(page.locator("#jobs-table tbody tr[data-job-id]").first).to_be_visible()
    expect(page.locator("#page .error-state")).to_have_count(0)
