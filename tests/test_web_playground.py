"""The playground in a real browser (Debian's chromium, driven by Playwright): typing into the page
shows the same top predictions, with the same probabilities, as gRPC answers for the same text, and
the two continuations of its session, forked in two, are Generate's over gRPC with the same seeds; the
model it names is the version its sessions run.

With RNNSERVE_PLAYGROUND_SCREENSHOT=docs/playground.png the test also writes the screenshot that README.md
and docs/API.md show.
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


def visible(page, selector: str) -> bool:
    return page.eval_on_selector(selector, "e => !e.hidden")


def position_line(page) -> str:
    return page.text_content("#position").strip()  # a non-breaking space when there is nothing to say


def bars(page) -> list[str]:
    return page.eval_on_selector_all("#predictions li", "rows => rows.map(r => r.dataset.token)")


def refuse_a_long_paste(page, before: str) -> str:
    """Type `before`, wait for its bars, then paste past the server's --max-input-chars (16384 by default)
    at its end, and wait for the refusal; the error place's text."""
    page.type("#text", before, delay=15)
    assert len(shown_predictions(page, before)) == TOP_K and position_line(page).startswith("session ")
    page.fill("#text", before + "a" * 17_000)
    page.wait_for_function("!document.querySelector('#error').hidden")
    return page.text_content("#error")


def test_a_refused_paste_leaves_no_bars_of_the_previous_text(browser, server):
    with playground(browser, server) as page:
        error = refuse_a_long_paste(page, "To be")
        assert bars(page) == [] and page.eval_on_selector("#predictions", "e => e.dataset.for") == ""
        assert position_line(page) == ""
        assert error.startswith("Not accepted: text: ") and "16384" in error  # the field and limit, in words
        assert "INVALID_ARGUMENT" not in error and "[" not in error
        assert not visible(page, "#no-prediction")  # the error says why there are no bars
        page.click("#generate")
        page.wait_for_function(BOTH_DONE)
        assert page.text_content("#generate-error") == "Nothing to continue: the text above was not accepted."
        assert page.text_content("#output-a") == page.text_content("#output-b") == ""
        page.fill("#text", "To be, or")  # the next text is read afresh, and the error goes
        assert_shows_grpcs_prediction(page, server, "To be, or")
        assert not visible(page, "#error") and position_line(page).startswith("session ")


def test_clearing_the_text_after_an_error_leaves_no_error_and_no_session_line(browser, server):
    with playground(browser, server) as page:
        refuse_a_long_paste(page, "Now is")
        page.fill("#text", "")
        page.wait_for_function("document.querySelector('#error').hidden")
        assert position_line(page) == "" and bars(page) == []
        assert visible(page, "#no-prediction")


def test_next_character_says_what_it_will_show_before_anything_is_typed(browser, server):
    with playground(browser, server) as page:
        page.wait_for_function("document.querySelector('#predictions').dataset.for === ''")
        assert visible(page, "#no-prediction") and bars(page) == []
        page.type("#text", "T")
        shown_predictions(page, "T")
        assert not visible(page, "#no-prediction")


def test_generate_errors_show_in_words_beside_the_outputs_not_in_them(browser, server):
    with playground(browser, server) as page:
        page.click("#generate")  # nothing typed: nothing to continue
        page.wait_for_function(BOTH_DONE)
        assert page.text_content("#generate-error") == "Type some text first: each fork continues it."
        page.type("#text", "To be", delay=15)
        shown_predictions(page, "To be")
        assert not visible(page, "#generate-error")  # it spoke of the text before
        page.fill("#max-tokens", "5000")  # past --max-generate-tokens: the server refuses the Generate
        page.click("#generate")
        page.wait_for_function(BOTH_DONE)
        assert page.text_content("#output-a") == page.text_content("#output-b") == ""
        assert page.text_content("#generate-error").startswith("Not accepted: max_tokens: ")
        page.fill("#max-tokens", "5")
        page.click("#generate")  # the next run clears the error and streams
        page.wait_for_function(BOTH_DONE)
        assert not visible(page, "#generate-error") and len(page.text_content("#output-a")) > 0


def test_the_token_fields_placeholder_fits_it(page):
    needed, room = page.evaluate("""() => {
        document.querySelector('header details').open = true;
        const input = document.querySelector('#token'), style = getComputedStyle(input);
        const context = document.createElement('canvas').getContext('2d');
        context.font = style.font;
        return [context.measureText(input.placeholder).width,
                input.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight)];
    }""")
    assert 0 < needed <= room


def test_without_a_token_it_says_so_and_a_token_typed_in_recovers(browser, tmp_path):
    """A server that checks tokens refuses the page until one is typed; then nothing of the refusal stays."""
    tokens = tmp_path / "tokens"
    tokens.write_text("playground-token-0123456789abcdef alice\n")
    running = RunningServer(load_bundle(default_bundle_path()),
                            Settings(**LOOPBACK, http_listen="127.0.0.1:0", auth_tokens_file=tokens))
    try:
        with playground(browser, running) as opened:
            opened.evaluate("localStorage.removeItem('rnnserve-token')")
            opened.reload()
            opened.wait_for_function("document.querySelector('#model').textContent.startsWith('A bearer token')")
            opened.type("#text", "To be", delay=15)
            opened.wait_for_function("!document.querySelector('#error').hidden")
            assert opened.text_content("#error").startswith("A bearer token the server knows is needed (top right): ")
            assert bars(opened) == [] and position_line(opened) == ""
            opened.click("header details summary")
            opened.fill("#token", "playground-token-0123456789abcdef")
            opened.dispatch_event("#token", "change")
            assert len(shown_predictions(opened, "To be")) == TOP_K
            assert not visible(opened, "#error") and opened.text_content("#model").startswith("shakespeare-lstm ")
    finally:
        running.stop()


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
