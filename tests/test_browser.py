"""The reference PWA in headless Chromium, against the real `pwachat serve` (and the fake upstream).

Playwright's sync API drives Debian's Chromium (never a downloaded browser). One browser per module,
a fresh context (so fresh localStorage and service workers) per test. Every wait is an explicit
Playwright wait with a deadline: the page reports its phase in body[data-state], and an answer's end
in its bubble's data-finish.

Resumed answers: a slow upstream answer (numbered words, one per delta, paced by the fake) is
interrupted by a reload, by the browser going offline, or by a real drop (tests/cut_proxy.py:
Chromium's emulated offline leaves an open stream flowing), and must end as the whole answer, each
word once, from one upstream request.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("playwright")
CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is not installed", allow_module_level=True)

from playwright.sync_api import (  # noqa: E402
    Browser,
    ConsoleMessage,
    Page,
    Request,
    Response,
    expect,
    sync_playwright,
)

from cut_proxy import CutProxy  # noqa: E402
from fake_upstream import FakeUpstream  # noqa: E402
from server import ROOT, Server, poll, start_server, stop_server  # noqa: E402
from sse_client import events, open_stream  # noqa: E402

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
def budget_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A token budget with room for many echo answers (each holds MAX_TOKENS=1000 back while it runs)."""
    yield from _serve(tmp_path_factory, "browser-budget", {**UNLIMITED, "TOKENS_PER_DAY": "50000"})


@pytest.fixture(scope="module")
def budget_openai_server(tmp_path_factory: pytest.TempPathFactory, fake: FakeUpstream) -> Iterator[Server]:
    """A token budget with room for one request at a time (each holds MAX_TOKENS=1000 back while it
    runs, and a question costs about 1100 at most), OpenAI against the fake, echo still on."""
    env = {
        "OPENAI_API_KEY": OPENAI_KEY,
        "OPENAI_BASE_URL": fake.openai_base_url,
        "UPSTREAM_MAX_RETRIES": "0",
        "WORKERS": "1",
        "TOKENS_PER_DAY": "2000",
        **UNLIMITED,
    }
    yield from _serve(tmp_path_factory, "browser-budget-openai", env)


@pytest.fixture(scope="module")
def spent_budget_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A token budget of 1: no message can ever fit in it, so the first one is refused."""
    yield from _serve(tmp_path_factory, "browser-spent", {**UNLIMITED, "TOKENS_PER_DAY": "1"})


@pytest.fixture(scope="module")
def unbudgeted_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Token budgets off (TOKENS_PER_DAY=0)."""
    yield from _serve(tmp_path_factory, "browser-unbudgeted", {**UNLIMITED, "TOKENS_PER_DAY": "0"})


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


def paced_words(fake: FakeUpstream, n: int, interval_s: float) -> list[str]:
    """A slow OpenAI answer: `n` numbered words, one per delta, `interval_s` apart. Returns the words."""
    words = [f"w{i:02d}" for i in range(n)]
    fake.behave("openai", deltas=[w + " " for w in words], chunk_interval_s=interval_s)
    return words


def answer_words(page: Page) -> list[str]:
    return (page.locator(ASSISTANT).last.text_content() or "").split()


def ask_openai(page: Page, server: Server | str, text: str) -> None:
    page.goto(server if isinstance(server, str) else url(server))
    wait_state(page, "ready")
    page.select_option("#provider", "openai")
    say(page, text)


def is_chat_post(response: Response) -> bool:
    """The answer to POST /api/chat/stream (its head: the body may still be streaming)."""
    return response.request.method == "POST" and response.url.endswith("/api/chat/stream")


def token_budget(server: Server) -> dict[str, int] | None:
    """The `tokens` block of GET /api/rate-limit (null when budgets are off), as this test sees it."""
    status, _, body = server.request("GET", "/api/rate-limit")
    assert status == 200, body
    return json.loads(body)["tokens"]


def refunded(server: Server, held: int) -> dict[str, int]:
    """The `tokens` block once more than `held` tokens are left (the answer's unused reservation back)."""

    def check() -> dict[str, int] | None:
        tokens = token_budget(server)
        return tokens if tokens and tokens["remaining"] > held else None

    return poll(check, 5, f"more than {held} tokens left")


def tokens_left(n: int) -> str:
    """What the page's budget display says with `n` tokens left."""
    return f"{n:,} token{'' if n == 1 else 's'} left today"


def human_duration(seconds: int) -> str:
    """app.js's humanDuration: "45 s", "12 min", "3 h 12 min" (minutes rounded up)."""
    if seconds < 60:
        return f"{max(1, seconds)} s"
    minutes = -(-seconds // 60)
    if minutes < 60:
        return f"{minutes} min"
    h, m = divmod(minutes, 60)
    return f"{h} h {m} min" if m else f"{h} h"


STREAM_PATH = re.compile(r"/api/chat/stream/(chat_[^/?]+)$")
STOP_PATH = re.compile(r"/api/chat/stream/(chat_[^/?]+)/stop$")


def is_stop(response: Response) -> bool:
    """An answer to POST /api/chat/stream/{id}/stop."""
    return response.request.method == "POST" and STOP_PATH.search(response.url) is not None


class Streams:
    """The resumes the page asked for (GET /api/chat/stream/{id}), as the browser sent them."""

    def __init__(self, page: Page) -> None:
        self.resumes: list[str | None] = []  # the Last-Event-ID of each GET /api/chat/stream/{id}
        page.on("request", self._request)

    def _request(self, request: Request) -> None:
        if request.method == "GET" and STREAM_PATH.search(request.url):
            self.resumes.append(request.headers.get("last-event-id"))


class Problems:
    """Console errors (Chromium reports CSP violations there) and uncaught page errors."""

    def __init__(self, page: Page) -> None:
        self.items: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda err: self.items.append(f"pageerror: {err}"))

    def _console(self, msg: ConsoleMessage) -> None:
        if msg.type == "error":
            self.items.append(f"console.error: {msg.text} @ {msg.location}")

    def besides_refusals(self) -> list[str]:
        """Everything but Chromium's own note of a refused request ("Failed to load resource: ... 429")."""
        return [p for p in self.items if "the server responded with a status of 429" not in p]


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

    # Stop: the page asks the server to stop, which lets go of the upstream.
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


# --------------------------------------------------------------------------------------------
# Token budgets
# --------------------------------------------------------------------------------------------


def test_token_budget_left_is_shown_and_refreshed_after_each_answer(
    page: Page, budget_server: Server
) -> None:
    problems = Problems(page)
    start = token_budget(budget_server)
    assert start is not None and start["limit"] == 50000, start
    open_ready(page, budget_server)
    budget = page.locator("#budget")
    expect(budget).to_be_visible()
    expect(budget).to_have_text(tokens_left(start["remaining"]))  # from /api/rate-limit, before any message
    expect(budget).to_have_attribute("data-spent", "false")
    expect(budget).to_have_attribute("title", re.compile(r"today of 50,000\."))

    left = start["remaining"]
    for question in ("count my tokens", "and these too, please"):
        with page.expect_response(is_chat_post) as chat:
            say_and_answer(page, question, f"You said: {question}")
        headers = chat.value.headers
        assert headers["x-tokenbudget-limit"] == "50000", headers
        held = int(headers["x-tokenbudget-remaining"])  # after holding back the request's worst case
        # The answer used far less than its MAX_TOKENS: the rest came back when it ended...
        now = refunded(budget_server, held)
        assert held < now["remaining"] < left, (held, now, left)
        # ...and the page, which asked /api/rate-limit again, shows what the server says.
        expect(budget).to_have_text(tokens_left(now["remaining"]))
        expect(budget).to_have_attribute("data-spent", "false")
        left = now["remaining"]

    page.reload()
    wait_state(page, "ready")
    expect(budget).to_have_text(tokens_left(left))
    assert problems.items == []


def test_a_used_up_token_budget_says_when_to_try_again(
    page: Page, budget_openai_server: Server, fake: FakeUpstream
) -> None:
    server = budget_openai_server
    fake.reset()
    paced_words(fake, 200, 0.05)  # a 10 s answer, holding its reservation all along
    problems = Problems(page)
    open_ready(page, server)
    page.select_option("#provider", "echo")
    budget = page.locator("#budget")
    expect(budget).to_have_text(tokens_left(2000))

    # The same caller (this machine's address) has a long answer running elsewhere: most of the
    # budget is held back for it, and the page's question does not fit in the rest.
    other = open_stream(server, {"message": "a long answer elsewhere", "provider": "openai"})
    with other.sock:
        status_code, headers = other.read_head()
        assert status_code == 200, status_code
        held = int(headers["x-tokenbudget-remaining"])
        chat_id = json.loads(events(other.read_events(1))[0].data)["id"]

        with page.expect_response(is_chat_post) as chat:
            say(page, "my turn")
        refusal = chat.value
        assert refusal.status == 429, refusal.status
        assert refusal.json()["error"]["code"] == "budget_exceeded"
        wait = int(refusal.headers["retry-after"])
        status = page.locator("#status")
        expect(status).to_have_text(f"Today's token budget is used up. Try again in {human_duration(wait)}.")
        expect(status).to_have_attribute("data-kind", "error")
        wait_state(page, "ready")
        expect(page.locator(ASSISTANT)).to_have_count(0)
        expect(page.locator(f"{USER}.failed")).to_have_text(["my turn"])
        expect(page.locator("#message")).to_have_value("my turn")
        # The display shows what is left, as the server says, marked as not enough.
        expect(budget).to_have_text(tokens_left(token_budget(server)["remaining"]))
        expect(budget).to_have_attribute("data-spent", "true")
        expect(budget).to_have_attribute("title", re.compile("cannot cover another message"))

        # The other answer is stopped: what it held back and did not use comes back...
        assert server.post_json(f"/api/chat/stream/{chat_id}/stop", {})[0] == 200
        fake.wait_for(lambda recs: [r for r in recs if r["client_gone"]], timeout=5)
    refunded(server, held)

    # ...and the question, offered again, goes through.
    page.press("#message", "Enter")
    expect(page.locator(ASSISTANT).last).to_have_text("You said: my turn")
    wait_state(page, "ready")
    expect(page.locator("#status")).to_have_text("")
    expect(budget).to_have_text(tokens_left(token_budget(server)["remaining"]))
    expect(budget).to_have_attribute("data-spent", "false")
    assert problems.besides_refusals() == []


def test_a_message_larger_than_the_whole_token_budget_says_so(
    page: Page, spent_budget_server: Server
) -> None:
    problems = Problems(page)
    open_ready(page, spent_budget_server)
    budget = page.locator("#budget")
    expect(budget).to_have_text("1 token left today")

    with page.expect_response(is_chat_post) as chat:
        say(page, "a question no budget of 1 token covers")
    refusal = chat.value
    assert refusal.status == 429, refusal.status
    assert refusal.json()["error"]["code"] == "budget_exceeded"
    # Nothing of the budget is used, yet the question is refused: waiting would not help.
    status = page.locator("#status")
    expect(status).to_have_text(
        "This message needs more tokens than the whole daily token budget (1 token). "
        "Start a new chat or send a shorter message."
    )
    expect(status).to_have_attribute("data-kind", "error")
    wait_state(page, "ready")
    # Not answered: no assistant bubble, the question is marked and offered again.
    expect(page.locator(ASSISTANT)).to_have_count(0)
    expect(page.locator(f"{USER}.failed")).to_have_text(["a question no budget of 1 token covers"])
    expect(page.locator("#message")).to_have_value("a question no budget of 1 token covers")
    # The budget display says it cannot cover a message, with what the server has left.
    tokens = token_budget(spent_budget_server)
    assert tokens is not None and tokens["limit"] == 1, tokens
    expect(budget).to_have_text(tokens_left(tokens["remaining"]))
    expect(budget).to_have_attribute("data-spent", "true")
    expect(budget).to_have_attribute("title", re.compile("cannot cover another message"))
    assert problems.besides_refusals() == []


def test_no_token_budget_display_when_budgets_are_off(page: Page, unbudgeted_server: Server) -> None:
    assert token_budget(unbudgeted_server) is None
    open_ready(page, unbudgeted_server)
    with page.expect_response(is_chat_post) as chat:
        say_and_answer(page, "no budget here", "You said: no budget here")
    assert "x-tokenbudget-remaining" not in chat.value.headers
    expect(page.locator("#quota")).to_have_text(re.compile(r"^\d+(/\d+)? left$"))
    expect(page.locator("#budget")).to_be_hidden()
    expect(page.locator("#budget")).to_have_text("")


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.2, "1 s"),
        (1, "1 s"),
        (59, "59 s"),
        (60, "1 min"),
        (61, "2 min"),
        (3599, "1 h"),
        (3600, "1 h"),
        (11_520, "3 h 12 min"),
        (11_521, "3 h 13 min"),
        (86_400, "24 h"),
    ],
)
def test_budget_wait_is_said_in_s_min_h(page: Page, echo_server: Server, seconds: float, text: str) -> None:
    page.goto(url(echo_server))
    got = page.evaluate(
        "async (s) => (await import('/static/app.js')).humanDuration(s)",
        seconds,
    )
    assert got == text
    assert human_duration(int(seconds)) == text  # the test's copy agrees


# --------------------------------------------------------------------------------------------
# Resumable streams and Stop
# --------------------------------------------------------------------------------------------


def test_a_reload_mid_answer_continues_the_same_answer(
    page: Page, openai_server: Server, fake: FakeUpstream
) -> None:
    fake.reset()
    words = paced_words(fake, 40, 0.1)
    streams = Streams(page)
    ask_openai(page, openai_server, "tell me a long story")
    expect(page.locator(ASSISTANT).last).to_contain_text("w05")

    page.reload()
    # The question and the answer so far are on screen again, and the answer goes on in that bubble.
    expect(page.locator(USER)).to_have_text(["tell me a long story"])
    expect(page.locator(ASSISTANT)).to_have_count(1)
    expect(page.locator(ASSISTANT).last).to_have_attribute("data-finish", "stop", timeout=TIMEOUT_MS)
    wait_state(page, "ready")
    assert answer_words(page) == words
    expect(page.locator("#status")).to_have_text("")
    # One resume, from the last event the first page rendered (a delta's id, not the start's 0).
    assert len(streams.resumes) == 1, streams.resumes
    assert 5 <= int(streams.resumes[0] or -1) <= len(words), streams.resumes
    # The provider was asked once: the answer was continued, not asked for again.
    recs = fake.requests("openai")
    assert len(recs) == 1 and recs[0]["completed"] and not recs[0]["client_gone"], recs

    # It is history now: another reload shows it once and resumes nothing.
    page.reload()
    wait_state(page, "ready")
    assert answer_words(page) == words
    assert len(streams.resumes) == 1


def test_offline_and_back_mid_answer_continues_it(
    page: Page, openai_server: Server, fake: FakeUpstream
) -> None:
    fake.reset()
    words = paced_words(fake, 40, 0.1)
    streams = Streams(page)
    ask_openai(page, openai_server, "a long answer while I go through a tunnel")
    expect(page.locator(ASSISTANT).last).to_contain_text("w05")

    page.context.set_offline(True)
    try:
        # The page lets its connection go at once (Chromium alone would keep it flowing) and says so.
        expect(page.locator("#status")).to_contain_text("Offline")
        # Meanwhile the server goes on generating (its grace period)...
        fake.wait_for(lambda recs: recs and recs[-1]["deltas_sent"] >= len(answer_words(page)) + 5, timeout=5)
    finally:
        page.context.set_offline(False)
    # ...and once back online the page picks the answer up where it left it.
    expect(page.locator(ASSISTANT).last).to_have_attribute("data-finish", "stop", timeout=TIMEOUT_MS)
    wait_state(page, "ready")
    assert answer_words(page) == words
    expect(page.locator("#status")).to_have_text("")
    # Every attempt (some failed while offline) asked for what followed the same rendered event.
    assert streams.resumes and len(set(streams.resumes)) == 1, streams.resumes
    assert 5 <= int(streams.resumes[0] or -1) < len(words), streams.resumes
    recs = fake.requests("openai")
    assert len(recs) == 1 and recs[0]["completed"] and not recs[0]["client_gone"], recs


def test_a_dropped_connection_mid_answer_is_resumed(
    page: Page, openai_server: Server, fake: FakeUpstream
) -> None:
    fake.reset()
    words = paced_words(fake, 40, 0.1)
    with CutProxy(openai_server.port) as proxy:
        streams = Streams(page)
        ask_openai(page, f"http://127.0.0.1:{proxy.port}/", "a long answer over a bad network")
        expect(page.locator(ASSISTANT).last).to_contain_text("w05")

        proxy.cut()  # the stream's read fails mid-body; reconnects fail too until restore()
        expect(page.locator("#status")).to_contain_text("resuming")
        poll(lambda: proxy.refused >= 2, 10, "the page retrying while the network is down")
        fake.wait_for(lambda recs: recs and recs[-1]["deltas_sent"] >= len(answer_words(page)) + 5, timeout=5)
        proxy.restore()

        expect(page.locator(ASSISTANT).last).to_have_attribute("data-finish", "stop", timeout=TIMEOUT_MS)
        wait_state(page, "ready")
        assert answer_words(page) == words
        expect(page.locator("#status")).to_have_text("")
        assert streams.resumes and len(set(streams.resumes)) == 1, streams.resumes
    recs = fake.requests("openai")
    assert len(recs) == 1 and recs[0]["completed"] and not recs[0]["client_gone"], recs


def test_stop_asks_the_server_to_stop_and_keeps_the_partial_answer(
    page: Page, openai_server: Server, fake: FakeUpstream
) -> None:
    fake.reset()
    words = paced_words(fake, 60, 0.1)
    streams = Streams(page)
    ask_openai(page, openai_server, "a long answer to stop")
    expect(page.locator(ASSISTANT).last).to_contain_text("w03")

    with page.expect_response(is_stop) as stop_answer:
        page.click("#stop")
        clicked = time.monotonic()
    wait_state(page, "ready")
    expect(page.locator("#status")).to_have_text("Stopped.")
    # The stream ended with the server's own `cancelled`, not with a local abort.
    expect(page.locator(ASSISTANT).last).to_have_attribute("data-finish", "cancelled")
    expect(page.locator(f"{ASSISTANT}.partial")).to_have_count(1)
    shown = answer_words(page)
    assert shown and shown == words[: len(shown)] and len(shown) < len(words), shown
    # (Only the status is read: Response.json() would wait for a body the page may not read.)
    assert stop_answer.value.status == 200
    # The upstream request was cancelled at once (a reader merely leaving would get the 20 s grace).
    gone = fake.wait_for(lambda recs: [r for r in recs if r["client_gone"]], timeout=5)
    assert len(gone) == 1 and gone[0]["deltas_sent"] < len(words), gone
    assert gone[0]["gone_at"] - clicked < 2.0, gone

    # The partial answer is history: after a reload it is there, and nothing is resumed.
    page.reload()
    wait_state(page, "ready")
    assert answer_words(page) == shown
    assert streams.resumes == []


def test_new_chat_while_streaming_stops_the_answer(
    page: Page, openai_server: Server, fake: FakeUpstream
) -> None:
    fake.reset()
    words = paced_words(fake, 60, 0.1)
    streams = Streams(page)
    ask_openai(page, openai_server, "an answer I will abandon")
    expect(page.locator(ASSISTANT).last).to_contain_text("w03")

    # Waited for through Playwright: its events reach this side only while one of its calls runs.
    with page.expect_response(is_stop) as stop_answer:
        page.click("#new-chat")
    assert stop_answer.value.status == 200
    expect(page.locator("#messages .message")).to_have_count(0)
    wait_state(page, "ready")
    gone = fake.wait_for(lambda recs: [r for r in recs if r["client_gone"]], timeout=5)
    assert len(gone) == 1 and gone[0]["deltas_sent"] < len(words), gone

    page.reload()
    wait_state(page, "ready")
    expect(page.locator("#messages .message")).to_have_count(0)
    assert streams.resumes == []


def test_an_answer_the_server_no_longer_has_keeps_its_partial_text(page: Page, echo_server: Server) -> None:
    # As a page reloaded after the server forgot the stream (restarted, or past STREAM_RETAIN_S) finds it.
    streams = Streams(page)
    page.goto(url(echo_server))
    page.evaluate(
        """() => localStorage.setItem('pwachat.pending', JSON.stringify({
            question: 'an old question', label: 'Echo · echo', id: 'chat_' + 'a'.repeat(24), last: 3,
            text: 'half an **answer**',
        }))"""
    )
    page.reload()
    wait_state(page, "ready")
    status = page.locator("#status")
    expect(status).to_contain_text("could not be resumed")
    expect(status).to_have_attribute("data-kind", "error")
    assert streams.resumes == ["3"]
    expect(page.locator(USER)).to_have_text(["an old question"])
    expect(page.locator(f"{ASSISTANT}.partial")).to_have_text(["half an answer"])
    expect(page.locator(f"{ASSISTANT} strong")).to_have_text("answer")
    # What arrived is history now, and nothing is left to resume.
    page.reload()
    wait_state(page, "ready")
    expect(page.locator(ASSISTANT)).to_have_text(["half an answer"])
    assert streams.resumes == ["3"]


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------

MARKDOWN_ANSWER = """## Steps

Use **bold**, *italic* and `inline code`.

1. first
2. second

- apple
- banana

> quoted

```python
print("hi <b>")
```

See [the docs](https://example.com/docs) or [bad](javascript:alert(1)).

<script>alert(1)</script> <img src=x onerror=alert(2)> <a href="javascript:alert(3)">a</a>
"""


def test_answers_render_markdown_and_markup_stays_text(
    page: Page, openai_server: Server, fake: FakeUpstream
) -> None:
    fake.reset()
    # Seven characters a delta: fences, markers and tags arrive cut in pieces, re-rendered as they come.
    pieces = [MARKDOWN_ANSWER[i : i + 7] for i in range(0, len(MARKDOWN_ANSWER), 7)]
    fake.behave("openai", deltas=pieces, chunk_interval_s=0.005)
    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=url(openai_server))
    problems = Problems(page)
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    ask_openai(page, openai_server, "Some **markdown** <i>please</i>")
    bubble = page.locator(ASSISTANT).last
    expect(bubble).to_have_attribute("data-finish", "stop")

    expect(bubble.locator("h2")).to_have_text("Steps")
    expect(bubble.locator("p strong")).to_have_text("bold")
    expect(bubble.locator("p em")).to_have_text("italic")
    expect(bubble.locator("p > code")).to_have_text("inline code")
    expect(bubble.locator("ol > li")).to_have_text(["first", "second"])
    expect(bubble.locator("ul > li")).to_have_text(["apple", "banana"])
    expect(bubble.locator("blockquote")).to_have_text("quoted")
    code = bubble.locator("pre > code")
    expect(code).to_have_text('print("hi <b>")')
    expect(code).to_have_class("language-python")
    # One link, the safe one, opening in a new tab without handing over the page.
    links = bubble.locator("a")
    expect(links).to_have_count(1)
    expect(links).to_have_attribute("href", "https://example.com/docs")
    expect(links).to_have_attribute("target", "_blank")
    expect(links).to_have_attribute("rel", "noopener noreferrer")
    # Markup and unsafe links are shown as the text they are, and no element came of them.
    for literal in (
        "[bad](javascript:alert(1))",
        "<script>alert(1)</script>",
        "<img src=x onerror=alert(2)>",
        '<a href="javascript:alert(3)">a</a>',
    ):
        expect(bubble).to_contain_text(literal)
    assert page.locator("#messages script, #messages img, #messages b, #messages [onerror]").count() == 0
    assert page.locator('#messages [href^="javascript"]').count() == 0
    # The question stays plain text.
    expect(page.locator(USER)).to_have_text(["Some **markdown** <i>please</i>"])
    assert page.locator(f"{USER} strong, {USER} i").count() == 0

    copy = bubble.locator("button.copy")
    expect(copy).to_have_count(1)
    copy.click()
    expect(copy).to_have_text("Copied")
    assert page.evaluate("() => navigator.clipboard.readText()") == 'print("hi <b>")'

    # Saved answers are rendered the same after a reload.
    page.reload()
    wait_state(page, "ready")
    expect(page.locator(f"{ASSISTANT} pre > code")).to_have_text('print("hi <b>")')
    expect(page.locator(f"{ASSISTANT} a")).to_have_count(1)
    assert page.locator("#messages script, #messages img").count() == 0
    assert dialogs == []
    assert problems.items == []


LINK = 'target="_blank" rel="noopener noreferrer"'
CODE_BAR = (
    '<div class="code-bar"><span class="code-lang">{0}</span>'
    '<button class="copy" type="button" aria-label="{1}">Copy</button></div>'
)

MARKDOWN_CASES = [
    (
        "plain *em* **strong** ***both*** ~~gone~~",
        "<p>plain <em>em</em> <strong>strong</strong> <strong><em>both</em></strong> <del>gone</del></p>",
    ),
    ("snake_case_name, 2 * 3 * 4 and a*b", "<p>snake_case_name, 2 * 3 * 4 and a*b</p>"),
    ("**a *b***", "<p><strong>a <em>b</em></strong></p>"),
    ("\\*not em\\* `*code*` `` a ` b ``", "<p>*not em* <code>*code*</code> <code>a ` b</code></p>"),
    ("**unclosed and *also", "<p>**unclosed and *also</p>"),
    ("line one\nline two", "<p>line one<br>line two</p>"),
    ("# Title\n\n> quoted\n> more", "<h1>Title</h1><blockquote><p>quoted<br>more</p></blockquote>"),
    ("1. one\n2. two\n   - nested", "<ol><li>one</li><li>two<ul><li>nested</li></ul></li></ol>"),
    ("3. three\n4. four", '<ol start="3"><li>three</li><li>four</li></ol>'),
    ("- a\n\n- b", "<ul><li><p>a</p></li><li><p>b</p></li></ul>"),
    ("Text:\n- a\n- b", "<p>Text:</p><ul><li>a</li><li>b</li></ul>"),
    ("above\n\n---\n\nbelow", "<p>above</p><hr><p>below</p>"),
    ("[x](https://example.com/a_b)", f'<p><a href="https://example.com/a_b" {LINK}>x</a></p>'),
    ('[x](https://example.com "T")', f'<p><a href="https://example.com/" title="T" {LINK}>x</a></p>'),
    ("[m](mailto:me@example.com)", f'<p><a href="mailto:me@example.com" {LINK}>m</a></p>'),
    ("<https://example.com/>", f'<p><a href="https://example.com/" {LINK}>https://example.com/</a></p>'),
    (
        "see https://example.com/x.",
        f'<p>see <a href="https://example.com/x" {LINK}>https://example.com/x</a>.</p>',
    ),
    ("![a cat](https://example.com/c.png)", f'<p><a href="https://example.com/c.png" {LINK}>a cat</a></p>'),
    ("[**b**](https://e.com)", f'<p><a href="https://e.com/" {LINK}><strong>b</strong></a></p>'),
    ("[x](javascript:alert(1))", "<p>[x](javascript:alert(1))</p>"),
    ("[x](JaVaScRiPt:alert(1))", "<p>[x](JaVaScRiPt:alert(1))</p>"),
    ("[x](<java\tscript:alert(1)>)", "<p>[x](&lt;java\tscript:alert(1)&gt;)</p>"),
    ("[x](data:text/html,<b>hi</b>)", "<p>[x](data:text/html,&lt;b&gt;hi&lt;/b&gt;)</p>"),
    ("[x](vbscript:msgbox(1))", "<p>[x](vbscript:msgbox(1))</p>"),
    ("[x](/relative)", "<p>[x](/relative)</p>"),
    ("<javascript:alert(1)>", "<p>&lt;javascript:alert(1)&gt;</p>"),
    ("<b>bold</b> &amp; <!-- c -->", "<p>&lt;b&gt;bold&lt;/b&gt; &amp;amp; &lt;!-- c --&gt;</p>"),
    (
        "```js\nlet a = '<b>';\n```",
        '<div class="code-block">'
        + CODE_BAR.format("js", "Copy js code")
        + "<pre><code class=\"language-js\">let a = '&lt;b&gt;';</code></pre></div>",
    ),
    (
        "```\nstill typing",
        '<div class="code-block">'
        + CODE_BAR.format("", "Copy code")
        + "<pre><code>still typing</code></pre></div>",
    ),
    (
        '```"><img src=x>\nx\n```',
        '<div class="code-block">'
        + CODE_BAR.format('"&gt;&lt;img', "Copy &quot;&gt;&lt;img code")
        + "<pre><code>x</code></pre></div>",
    ),
]


@pytest.mark.parametrize(("source", "html"), MARKDOWN_CASES)
def test_markdown_renderer(page: Page, echo_server: Server, source: str, html: str) -> None:
    """markdown.js on its own: what DOM each piece of Markdown becomes (read back as HTML)."""
    page.goto(url(echo_server))
    got = page.evaluate(
        """async (source) => {
            const { MarkdownView } = await import('/static/markdown.js');
            const root = document.createElement('div');
            new MarkdownView(root).render(source);
            return root.innerHTML;
        }""",
        source,
    )
    assert got == html


def test_markdown_rerendering_matches_a_fresh_render_and_keeps_finished_blocks(
    page: Page, echo_server: Server
) -> None:
    page.goto(url(echo_server))
    result = page.evaluate(
        """async (doc) => {
            const { MarkdownView } = await import('/static/markdown.js');
            const live = document.createElement('div');
            const view = new MarkdownView(live);
            const firstDone = doc.indexOf('\\n\\n') + 3;
            let first = null;
            let kept = true;
            for (let n = 1; n <= doc.length; n++) {
                view.render(doc.slice(0, n));
                if (n < firstDone) continue;
                first ??= live.firstElementChild;
                kept &&= live.firstElementChild === first;
            }
            const fresh = document.createElement('div');
            new MarkdownView(fresh).render(doc);
            return { same: live.innerHTML === fresh.innerHTML, kept, html: live.innerHTML };
        }""",
        MARKDOWN_ANSWER,
    )
    assert result["same"], result["html"]
    assert result["kept"]  # the heading was built once, not on every delta


EVENTSOURCE_RESUME_JS = """
async () => {
  // Start a stream, leave after three deltas, then resume it with the browser's own EventSource.
  const ctl = new AbortController();
  const res = await fetch('/api/chat/stream', {
    method: 'POST', signal: ctl.signal, headers: {'Content-Type': 'application/json'},
    body: JSON.stringify({message: 'count slowly', provider: 'openai'}),
  });
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '', id = null, seen = [];
  while (seen.length < 3) {
    const {value} = await reader.read();
    buffer += value;
    for (const block of buffer.split('\\n\\n').slice(0, -1)) {
      const data = block.split('\\n').find((l) => l.startsWith('data: ')).slice(6);
      if (block.includes('event: start')) id = JSON.parse(data).id;
      if (block.includes('event: delta')) seen.push(JSON.parse(data).content);
    }
    buffer = buffer.slice(buffer.lastIndexOf('\\n\\n') + 2);
  }
  ctl.abort();
  return await new Promise((resolve, reject) => {
    const rest = [], ids = [];
    const source = new EventSource(`/api/chat/stream/${id}?last_event_id=3`);
    source.addEventListener('delta', (e) => {
      rest.push(JSON.parse(e.data).content);
      ids.push(e.lastEventId);
    });
    source.addEventListener('done', (e) => {
      source.close();
      resolve({seen, rest, ids, finish: JSON.parse(e.data).finish_reason, last: e.lastEventId});
    });
    source.onerror = () => { source.close(); reject(new Error('EventSource failed')); };
  });
}
"""


def test_a_browser_eventsource_resumes_a_stream(
    page: Page, openai_server: Server, fake: FakeUpstream
) -> None:
    """The contract: a plain `EventSource` on GET /api/chat/stream/{id} picks a stream up."""
    fake.reset()
    words = paced_words(fake, 12, 0.1)
    page.goto(url(openai_server))
    got = page.evaluate(EVENTSOURCE_RESUME_JS)
    assert "".join(got["seen"] + got["rest"]).split() == words
    assert got["ids"] == [str(i) for i in range(4, 4 + len(got["rest"]))]
    assert got["finish"] == "stop" and int(got["last"]) == len(words) + 1
    recs = fake.requests("openai")
    assert len(recs) == 1 and recs[0]["completed"], recs  # the answer went on; never asked again
