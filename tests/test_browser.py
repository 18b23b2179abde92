"""The reference PWA in headless Chromium, against the real `pwachat serve` (and the fake upstream).

Playwright's sync API drives Debian's Chromium (never a downloaded browser). One browser per module,
a fresh context (so fresh localStorage and service workers) per test. Every wait is an explicit
Playwright wait with a deadline: the page reports its phase in body[data-state].
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("playwright")
CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is not installed", allow_module_level=True)

from playwright.sync_api import Browser, ConsoleMessage, Page, expect, sync_playwright  # noqa: E402

from fake_upstream import FakeUpstream  # noqa: E402
from server import ROOT, Server, start_server, stop_server  # noqa: E402

pytestmark = pytest.mark.e2e

TIMEOUT_MS = 10_000
OPENAI_KEY = "sk-test-openai"
UNLIMITED = {"RATELIMIT_PER_MINUTE": "100000", "RATELIMIT_PER_HOUR": "100000", "RATELIMIT_PER_DAY": "100000"}

ASSISTANT = "#messages .message.assistant"
USER = "#messages .message.user"


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context()
    context.set_default_timeout(TIMEOUT_MS)
    try:
        yield context.new_page()
    finally:
        context.close()


def _serve(tmp: pytest.TempPathFactory, name: str, env: dict[str, str]) -> Iterator[Server]:
    srv = start_server(tmp.mktemp(name), **env)
    try:
        yield srv
    finally:
        stop_server(srv)


@pytest.fixture(scope="module")
def echo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Defaults (echo on), no practical rate limit."""
    yield from _serve(tmp_path_factory, "browser-echo", dict(UNLIMITED))


@pytest.fixture(scope="module")
def limited_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One chat request per minute."""
    yield from _serve(tmp_path_factory, "browser-limited", {"RATELIMIT_PER_MINUTE": "1"})


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream(OPENAI_KEY) as upstream:
        yield upstream


@pytest.fixture(scope="module")
def openai_server(tmp_path_factory: pytest.TempPathFactory, fake: FakeUpstream) -> Iterator[Server]:
    """OpenAI against the fake upstream (no retries), echo still on."""
    env = {
        "OPENAI_API_KEY": OPENAI_KEY,
        "OPENAI_BASE_URL": fake.openai_base_url,
        "UPSTREAM_MAX_RETRIES": "0",
        "WORKERS": "1",
        **UNLIMITED,
    }
    yield from _serve(tmp_path_factory, "browser-openai", env)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def url(server: Server, path: str = "/") -> str:
    return f"http://{server.host}:{server.port}{path}"


def wait_state(page: Page, *states: str) -> None:
    page.wait_for_function(
        "states => states.includes(document.body.dataset.state)", arg=list(states), timeout=TIMEOUT_MS
    )


def open_ready(page: Page, server: Server) -> None:
    page.goto(url(server))
    wait_state(page, "ready")


def say(page: Page, text: str) -> None:
    page.fill("#message", text)
    page.press("#message", "Enter")


def say_and_answer(page: Page, text: str, answer: str) -> None:
    """Send `text` and wait until the last assistant bubble reads `answer` and the stream has ended."""
    say(page, text)
    expect(page.locator(ASSISTANT).last).to_have_text(answer, timeout=TIMEOUT_MS)
    wait_state(page, "ready")


class Problems:
    """Console errors (Chromium reports CSP violations there) and uncaught page errors."""

    def __init__(self, page: Page) -> None:
        self.items: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda err: self.items.append(f"pageerror: {err}"))

    def _console(self, msg: ConsoleMessage) -> None:
        if msg.type == "error":
            self.items.append(f"console.error: {msg.text} @ {msg.location}")


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


def test_echo_chat_clean_console_manifest_and_service_worker(page: Page, echo_server: Server) -> None:
    problems = Problems(page)
    open_ready(page, echo_server)

    say_and_answer(page, "hello browser", "You said: hello browser")
    expect(page.locator(USER)).to_have_text(["hello browser"])
    expect(page.locator(ASSISTANT)).to_have_count(1)
    expect(page.locator("#status")).to_have_text("")
    expect(page.locator("#quota")).to_have_text(re.compile(r"^\d+(/\d+)? left$"))

    manifest: dict[str, Any] = page.evaluate(
        """async () => {
            const link = document.querySelector('link[rel="manifest"]');
            const res = await fetch(link.href);
            return { status: res.status, type: res.headers.get('content-type'), body: await res.json() };
        }"""
    )
    assert manifest["status"] == 200, manifest
    assert manifest["type"].startswith("application/manifest+json"), manifest
    assert manifest["body"].get("name"), manifest

    worker = page.evaluate(
        """async () => {
            const reg = await navigator.serviceWorker.ready;
            return { scope: reg.scope, script: reg.active && reg.active.scriptURL };
        }"""
    )
    assert worker["scope"] == url(echo_server, "/"), worker
    assert worker["script"] == url(echo_server, "/sw.js"), worker

    artifacts = ROOT / "artifacts"
    artifacts.mkdir(exist_ok=True)
    page.screenshot(path=str(artifacts / "chat.png"), full_page=True)

    assert problems.items == []


def test_reload_keeps_history_and_new_chat_clears_it(page: Page, echo_server: Server) -> None:
    open_ready(page, echo_server)
    say_and_answer(page, "remember me", "You said: remember me")

    page.reload()
    wait_state(page, "ready")
    expect(page.locator(USER)).to_have_text(["remember me"])
    expect(page.locator(ASSISTANT)).to_have_text(["You said: remember me"])

    page.click("#new-chat")
    expect(page.locator("#messages .message")).to_have_count(0)
    page.reload()
    wait_state(page, "ready")
    expect(page.locator("#messages .message")).to_have_count(0)


def test_rate_limit_shows_retry_after(page: Page, limited_server: Server) -> None:
    open_ready(page, limited_server)
    say_and_answer(page, "first", "You said: first")

    say(page, "second")
    status = page.locator("#status")
    expect(status).to_have_text(re.compile(r"try again in \d+ s"), timeout=TIMEOUT_MS)
    expect(status).to_have_attribute("data-kind", "error")
    wait_state(page, "ready")
    # The refused question is not answered: no second assistant bubble, the text is offered again.
    expect(page.locator(ASSISTANT)).to_have_count(1)
    expect(page.locator(f"{USER}.failed")).to_have_text(["second"])
    expect(page.locator("#message")).to_have_value("second")


def test_stop_mid_stream_error_and_provider_switch(
    page: Page, openai_server: Server, fake: FakeUpstream
) -> None:
    fake.reset()
    open_ready(page, openai_server)

    # Stop: the browser aborts, the server notices and lets go of the upstream.
    page.select_option("#provider", "openai")
    fake.behave("openai", chunks=40, chunk_interval_s=0.2)
    say(page, "a long answer please")
    wait_state(page, "streaming")
    expect(page.locator(ASSISTANT)).to_have_text([re.compile(r"\S")], timeout=TIMEOUT_MS)  # some text arrived
    page.click("#stop")
    wait_state(page, "ready")
    expect(page.locator("#status")).to_have_text("Stopped.")
    expect(page.locator(f"{ASSISTANT}.partial")).to_have_count(1)
    gone = fake.wait_for(lambda recs: [r for r in recs if r["client_gone"]], timeout=5)
    assert len(gone) == 1 and gone[0]["deltas_sent"] < 40, gone

    # A provider error after the stream has started: an `error` event, shown as an error.
    fake.behave("openai", deltas=["a ", "b ", "c "], error_event_after=1)
    say(page, "fail half way")
    status = page.locator("#status")
    expect(status).to_have_attribute("data-kind", "error", timeout=TIMEOUT_MS)
    expect(status).not_to_have_text("")
    wait_state(page, "ready")
    expect(page.locator(ASSISTANT).last).to_have_text("a ")
    # The history went with the message: the earlier question and its partial answer, in order.
    sent = fake.requests("openai")[1]["body"]["messages"]
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "user"]
    assert sent[1]["content"] == "a long answer please" and sent[-1]["content"] == "fail half way"

    # Back to echo: answered locally.
    page.select_option("#provider", "echo")
    say_and_answer(page, "after the switch", "You said: after the switch")
    expect(page.locator("#status")).to_have_text("")
    assert len(fake.requests("openai")) == 2


def test_offline_the_shell_loads_from_the_service_worker_and_says_so(page: Page, echo_server: Server) -> None:
    open_ready(page, echo_server)
    page.evaluate("() => navigator.serviceWorker.ready.then(() => true)")
    # The page must be controlled by the worker before going offline (first load is not).
    page.reload()
    page.wait_for_function("() => navigator.serviceWorker.controller !== null")
    page.context.set_offline(True)
    try:
        page.reload()
        # The shell came from the cache (no network), and the page says the backend cannot be reached.
        expect(page.locator("body")).to_have_attribute("data-state", "unavailable")
        expect(page.locator("#status")).to_have_attribute("data-kind", "offline")
        expect(page.locator("#status")).to_contain_text("unreachable")
        expect(page.locator("#send")).to_be_disabled()
    finally:
        page.context.set_offline(False)
    # Back online: the page's own retry (every 10 s) reaches the API, which the worker never answers
    # from a cache.
    expect(page.locator("body")).to_have_attribute("data-state", "ready", timeout=3 * TIMEOUT_MS)


def test_phone_sized_screen_and_keyboard_only(browser: Browser, echo_server: Server) -> None:
    context = browser.new_context(viewport={"width": 360, "height": 640}, is_mobile=True, has_touch=True)
    context.set_default_timeout(TIMEOUT_MS)
    try:
        page = context.new_page()
        open_ready(page, echo_server)
        # Nothing wider than the screen: no sideways scrolling on a phone.
        assert page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth")
        for selector in ("#message", "#send", "#new-chat", "#provider"):
            assert page.locator(selector).is_visible()
        # Keyboard only: Tab reaches the message box, Enter sends.
        page.locator("body").focus()
        for _ in range(12):
            if page.evaluate("() => document.activeElement && document.activeElement.id") == "message":
                break
            page.keyboard.press("Tab")
        assert page.evaluate("() => document.activeElement.id") == "message"
        page.keyboard.type("from the keyboard")
        page.keyboard.press("Enter")
        expect(page.locator(ASSISTANT).last).to_have_text("You said: from the keyboard")
    finally:
        context.close()


def test_answers_are_text_never_html(page: Page, echo_server: Server) -> None:
    open_ready(page, echo_server)
    markup = '<img src="x" id="injected"><b>bold</b>'
    say_and_answer(page, markup, f"You said: {markup}")
    assert page.locator("#injected").count() == 0
    assert page.locator("#messages b").count() == 0
