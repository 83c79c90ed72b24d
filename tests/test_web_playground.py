"""The playground in a real browser (Debian's chromium, driven by Playwright): typing into the page
shows the same top predictions, with the same probabilities, as gRPC answers for the same text, and
the two continuations of its session, forked in two, are Generate's over gRPC with the same seeds; the
model it names is the version its sessions run.

With RNNSERVE_PLAYGROUND_SCREENSHOT=docs/playground.png the test also writes the README's screenshot.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from conftest import LOOPBACK
from faces import GrpcFace
from rnnserve.bundle import default_bundle_path, load_bundle
from rnnserve.server.settings import Settings
from serving import RunningServer, repository

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# The flags of a headless run on a machine with no display, no GPU and no network beyond loopback.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
TOP_K = 10  # playground.js shows this many
BOTH_DONE = "['a', 'b'].every(pane => document.querySelector('#output-' + pane).dataset.done === 'true')"

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason="needs Debian's chromium (make test installs it: SYSTEM_PACKAGES)")


@pytest.fixture(scope="module")
def server():
    running = RunningServer(load_bundle(default_bundle_path()), Settings(**LOOPBACK, http_listen="127.0.0.1:0"))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def browser():
    """One headless chromium for the module: Playwright's sync API runs one at a time in a process."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@contextmanager
def playground(browser, server: RunningServer) -> Iterator:
    """The playground page of `server`, in a new page of `browser`."""
    opened = browser.new_page(viewport={"width": 900, "height": 800})
    opened.goto(f"http://127.0.0.1:{server.server.http_port}/")
    yield opened
    opened.close()


@pytest.fixture(scope="module")
def page(browser, server):
    with playground(browser, server) as opened:
        yield opened


def shown_predictions(page, text: str) -> list[tuple[str, float, str]]:
    """(token, probability, percentage shown) of each bar, once the page shows the prediction after `text`."""
    page.wait_for_function("text => document.querySelector('#predictions').dataset.for === text", arg=text)
    return [(token, float(probability), shown) for token, probability, shown in page.eval_on_selector_all(
        "#predictions li", "rows => rows.map(r => [r.dataset.token, r.dataset.probability, "
                           "r.querySelector('.probability').textContent])")]


def assert_shows_grpcs_prediction(page, server, text: str) -> None:
    face = GrpcFace(server.address)
    expected = face.call("CreateSession", {"prompt_text": text, "top_k": TOP_K})["prediction"]
    face.close()
    shown = shown_predictions(page, text)
    assert [token for token, _, _ in shown] == expected["texts"]
    assert [probability for _, probability, _ in shown] == pytest.approx(expected["probabilities"], rel=1e-6)
    assert [label for _, _, label in shown] == [f"{p * 100:.2f}%" for p in expected["probabilities"]]


def test_typing_shows_the_grpc_prediction_for_the_text(page, server):
    page.type("#text", "To be, or not to b", delay=15)  # a step per key: the session follows the typing
    assert_shows_grpcs_prediction(page, server, "To be, or not to b")
    page.press("#text", "Backspace")
    page.press("#text", "Backspace")  # earlier text changed: the page starts a new session
    page.type("#text", "\nHAM", delay=15)
    assert_shows_grpcs_prediction(page, server, "To be, or not to\nHAM")


def test_fork_and_generate_streams_generate_with_both_seeds(page, server):
    page.fill("#text", "Now is the winter of ")
    page.dispatch_event("#text", "input")
    page.fill("#max-tokens", "60")
    page.fill("#temperature", "0.8")
    page.fill("#seed", "7")
    page.click("#generate")
    page.wait_for_function(BOTH_DONE)
    metrics = httpx.get(f"http://127.0.0.1:{server.server.metrics_port}/metrics").text
    assert 'rnnserve_http_requests_total{code="200",method="ForkSession"} 1.0' in metrics  # one fork in two
    face = GrpcFace(server.address)
    for pane, seed in (("a", 7), ("b", 8)):
        session = face.call("CreateSession", {"prompt_text": "Now is the winter of "})["session"]["session_id"]
        tokens = face.call("Generate", {"session_id": session, "max_tokens": 60, "temperature": 0.8, "seed": seed})
        assert page.eval_on_selector(f"#output-{pane}", "e => e.textContent") == "".join(t["text"] for t in tokens)
    face.close()
    screenshot = os.environ.get("RNNSERVE_PLAYGROUND_SCREENSHOT")
    if screenshot:
        page.fill("#text", "To be, or not to b")
        page.dispatch_event("#text", "input")
        shown_predictions(page, "To be, or not to b")
        page.click("#generate")
        page.wait_for_function(BOTH_DONE)
        page.screenshot(path=screenshot, full_page=True)


def test_the_page_names_the_version_its_sessions_run(browser, tmp_path, versions):
    """ListModels lists the default model's versions in order, so its first is not always the default one."""
    running = RunningServer(None, Settings(**LOOPBACK, http_listen="127.0.0.1:0", model_poll_seconds=0,
                                           model_repository=repository(tmp_path, versions, "tiny/1", "tiny/2")))
    try:
        with playground(browser, running) as opened:
            opened.wait_for_function("document.querySelector('#model').textContent.startsWith('tiny ')")
            assert opened.text_content("#model").startswith("tiny 2: LSTM 2 \u00d7 16")
    finally:
        running.stop()


def test_the_page_names_another_architecture_by_its_state(browser, tmp_path, bundles):
    """A model with no layers or hidden size in its manifest (a state-space layer) is shown by its state tensor."""
    from bench.models import repository as copies

    running = RunningServer(None, Settings(**LOOPBACK, http_listen="127.0.0.1:0", model_poll_seconds=0,
                                           model_repository=copies(bundles["ssm"], tmp_path / "models", ["ssm"])))
    try:
        with playground(browser, running) as opened:
            opened.wait_for_function("document.querySelector('#model').textContent.startsWith('ssm ')")
            assert opened.text_content("#model") == "ssm 1: SSM ssm [1 \u00d7 2 \u00d7 4 \u00d7 3], 47 tokens"
    finally:
        running.stop()


def test_typing_into_a_subword_model_shows_the_prediction_for_the_whole_text(browser, bundles):
    """Typing ends in the prediction CreateSession gives for the whole text, not for the text's keystrokes read as
    separate pieces (which a subword tokenizer splits otherwise)."""
    running = RunningServer(bundles["bpe"], Settings(**LOOPBACK, http_listen="127.0.0.1:0"))
    try:
        with playground(browser, running) as opened:
            opened.wait_for_function("document.querySelector('#model').textContent.startsWith('tiny-bpe ')")
            opened.type("#text", "the king speak", delay=15)
            assert_shows_grpcs_prediction(opened, running, "the king speak")
    finally:
        running.stop()
