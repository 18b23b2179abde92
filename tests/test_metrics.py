"""GET /metrics (pwachat/metrics.py, routes/metrics.py): the Prometheus text, summed over every
worker of the instance, against the real `pwachat serve` with two workers, and its access rules
in-process."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fake_upstream import FakeUpstream
from pwachat import metrics
from pwachat.metrics import HEADER, Layout, Metrics, render
from pwachat.settings import Settings
from server import Server, poll, sse_request, start_server, stop_server

OPENAI_KEY = "sk-test-metrics"

#: The contract's table ("Metrics" in API.md): every family and its type.
CONTRACT = {
    "pwachat_http_requests_total": "counter",
    "pwachat_http_request_duration_seconds": "histogram",
    "gen_ai_client_operation_duration_seconds": "histogram",
    "gen_ai_server_time_to_first_token_seconds": "histogram",
    "gen_ai_client_token_usage": "histogram",
    "pwachat_streams_active": "gauge",
    "pwachat_stream_events_total": "counter",
    "pwachat_stream_resumes_total": "counter",
    "pwachat_ratelimit_decisions_total": "counter",
    "pwachat_budget_tokens_total": "counter",
    "pwachat_upstream_errors_total": "counter",
    "pwachat_provider_fallbacks_total": "counter",
    "pwachat_redis_up": "gauge",
}
LABELS = {
    "pwachat_http_requests_total": {"route", "method", "status"},
    "pwachat_http_request_duration_seconds": {"route"},
    "gen_ai_client_operation_duration_seconds": {
        "gen_ai_provider_name",
        "gen_ai_request_model",
        "error_type",
    },
    "gen_ai_server_time_to_first_token_seconds": {"gen_ai_provider_name", "gen_ai_request_model"},
    "gen_ai_client_token_usage": {"gen_ai_provider_name", "gen_ai_request_model", "gen_ai_token_type"},
    "pwachat_stream_events_total": {"outcome"},
    "pwachat_stream_resumes_total": {"outcome"},
    "pwachat_ratelimit_decisions_total": {"decision", "source"},
    "pwachat_budget_tokens_total": {"kind"},
    "pwachat_upstream_errors_total": {"gen_ai_provider_name", "code"},
    "pwachat_provider_fallbacks_total": {"from", "to"},
}


def families(text: str) -> dict[str, object]:
    # The parser names counters without `_total`; keyed here by the exposed name.
    out = {}
    for fam in text_string_to_metric_families(text):
        out[fam.name + "_total" if fam.type == "counter" else fam.name] = fam
    return out


def sample(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


# -- against the real server, two workers ---------------------------------------------------------


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream(OPENAI_KEY) as up:
        yield up


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, fake: FakeUpstream) -> Iterator[tuple[Server, Path]]:
    tmp = tmp_path_factory.mktemp("metrics")
    srv = start_server(
        tmp,
        WORKERS="2",
        TMPDIR=str(tmp),  # where `pwachat serve` makes the instance's metrics directory
        OPENAI_API_KEY=OPENAI_KEY,
        OPENAI_BASE_URL=fake.openai_base_url,
        UPSTREAM_MAX_RETRIES="0",
        STREAM_GRACE_S="0",  # a reader leaving cancels at once (`cancelled`); the grace: test_e2e_resume.py
        RATELIMIT_PER_MINUTE="100000",
        RATELIMIT_PER_HOUR="100000",
        RATELIMIT_PER_DAY="100000",
    )
    try:
        yield srv, tmp
    finally:
        stop_server(srv)


def scrape(srv: Server) -> str:
    status, headers, body = srv.request("GET", "/metrics")
    assert status == 200, body
    assert headers["content-type"].startswith("text/plain; version=0.0.4"), headers
    return body.decode()


def test_n_requests_are_n_in_the_sum_over_both_workers(served: tuple[Server, Path]) -> None:
    srv, tmp = served
    before = sample(
        scrape(srv), "pwachat_http_requests_total", route="/api/health", method="GET", status="200"
    )
    pids: set[int] = set()
    sent = 0
    deadline = time.monotonic() + 20
    # Each request on a new connection, until both workers have answered some (the kernel picks).
    while (sent < 60 or len(pids) < 2) and time.monotonic() < deadline:
        status, _, body = srv.request("GET", "/api/health")
        assert status == 200
        pids.add(json.loads(body)["runtime"]["pid"])
        sent += 1
    assert len(pids) == 2, f"all {sent} requests went to one worker"
    dirs = list(tmp.glob("pwachat-metrics-*"))
    assert len(dirs) == 1, dirs
    files = {HEADER.unpack_from(p.read_bytes())[2] for p in dirs[0].glob("worker-*.bin")}
    assert pids <= files, (pids, files)

    def counted() -> bool:
        now = sample(
            scrape(srv), "pwachat_http_requests_total", route="/api/health", method="GET", status="200"
        )
        return now - before == sent

    poll(counted, 5, f"{sent} requests in the summed counter")
    text = scrape(srv)
    got = sample(text, "pwachat_http_requests_total", route="/api/health", method="GET", status="200")
    assert got - before == sent  # exactly: not one more, however often scraped
    assert sample(text, "pwachat_http_request_duration_seconds_count", route="/api/health") >= sent


def test_every_family_of_the_contract_parses_with_its_type_and_labels(served: tuple[Server, Path]) -> None:
    srv, _ = served
    text = scrape(srv)
    found = families(text)
    for name, kind in CONTRACT.items():
        assert name in found, f"{name} missing"
        assert found[name].type == kind, (name, found[name].type)
    for line in text.splitlines():
        if line.startswith("# TYPE"):
            _, _, name, _ = line.split()
            assert name in CONTRACT, f"{name} is not in the contract's table"
    for name, names in LABELS.items():
        for s in found[name].samples:
            assert set(s.labels) - {"le"} == names, (name, s.labels)
    # Families of features still to come are there with their enum series, at zero.
    assert sample(text, "pwachat_stream_resumes_total", outcome="not_found") == 0
    assert sample(text, "pwachat_redis_up") == 0  # memory:// limiter: no Redis


def test_a_held_stream_shows_in_streams_active(served: tuple[Server, Path], fake: FakeUpstream) -> None:
    srv, _ = served
    assert sample(scrape(srv), "pwachat_streams_active") == 0
    fake.behave("openai", count=1, chunks=30, chunk_interval_s=0.1)
    body = json.dumps({"message": "a long story", "provider": "openai"}).encode()
    sock = sse_request(srv.port, body)
    try:
        got = b""
        while b"event: delta" not in got:
            chunk = sock.recv(65536)
            assert chunk, got
            got += chunk
        poll(lambda: sample(scrape(srv), "pwachat_streams_active") == 1, 5, "the stream to be counted")
        while chunk:
            chunk = sock.recv(65536)
            got += chunk
        assert b"event: done" in got
    finally:
        sock.close()
    poll(lambda: sample(scrape(srv), "pwachat_streams_active") == 0, 5, "the stream to end")
    text = scrape(srv)
    assert sample(text, "pwachat_ratelimit_decisions_total", decision="admitted", source="local") >= 1
    assert (
        sample(text, "pwachat_http_requests_total", route="/api/chat/stream", method="POST", status="200")
        >= 1
    )


def _stream(srv: Server, leave_after_first_delta: bool = False) -> bytes:
    body = json.dumps({"message": "count me", "provider": "openai"}).encode()
    sock = sse_request(srv.port, body)
    try:
        got = b""
        while chunk := sock.recv(65536):
            got += chunk
            if leave_after_first_delta and b"event: delta" in got:
                break
        return got
    finally:
        sock.close()


def test_provider_calls_are_counted_by_outcome(served: tuple[Server, Path], fake: FakeUpstream) -> None:
    """The gen_ai families, the stream outcomes and the upstream errors, each moved by exactly the
    requests that should move it (both workers summed)."""
    srv, _ = served
    op = "gen_ai_client_operation_duration_seconds_count"
    usage = "gen_ai_client_token_usage_sum"
    ours = {"gen_ai_provider_name": "openai"}

    def figures() -> dict[str, float]:
        text = scrape(srv)
        return {
            "ok_calls": sample(text, op, error_type="", **ours),
            "failed_calls": sample(text, op, error_type="upstream_error", **ours),
            "ttft": sample(text, "gen_ai_server_time_to_first_token_seconds_count", **ours),
            "input": sample(text, usage, gen_ai_token_type="input", **ours),
            "output": sample(text, usage, gen_ai_token_type="output", **ours),
            "done": sample(text, "pwachat_stream_events_total", outcome="done"),
            "error": sample(text, "pwachat_stream_events_total", outcome="error"),
            "cancelled": sample(text, "pwachat_stream_events_total", outcome="cancelled"),
            "upstream_errors": sample(text, "pwachat_upstream_errors_total", code="upstream_error", **ours),
        }

    def moved_by(expected: dict[str, float], before: dict[str, float]) -> None:
        def settled() -> dict[str, float] | None:
            now = figures()
            delta = {k: now[k] - before[k] for k in now}
            return delta if delta == {k: expected.get(k, 0) for k in now} else None

        poll(settled, 5, f"the counts to move by {expected} (now {figures()} from {before})")

    # A whole stream: one successful call, its first token, its usage, `done`.
    before = figures()
    fake.behave("openai", count=1, chunks=4, input_tokens=17, output_tokens=23)
    assert b"event: done" in _stream(srv)
    moved_by({"ok_calls": 1, "ttft": 1, "input": 17, "output": 23, "done": 1}, before)

    # A non-streamed chat: a call and its usage, no stream outcome.
    before = figures()
    fake.behave("openai", count=1, input_tokens=5, output_tokens=7)
    status, _, _ = srv.post_json("/api/chat", {"message": "count me", "provider": "openai"})
    assert status == 200
    moved_by({"ok_calls": 1, "input": 5, "output": 7}, before)

    # The provider refuses at once: a JSON error, a failed call and an upstream error; no stream.
    before = figures()
    fake.behave("openai", count=1, status=503)
    assert _stream(srv).startswith(b"HTTP/1.1 502")
    moved_by({"failed_calls": 1, "upstream_errors": 1}, before)

    # The provider fails mid-stream: the `error` outcome, after a first token.
    before = figures()
    fake.behave("openai", count=1, chunks=5, error_event_after=2)
    assert b"event: error" in _stream(srv)
    moved_by({"failed_calls": 1, "upstream_errors": 1, "ttft": 1, "error": 1}, before)

    # The reader leaves mid-stream: `cancelled`, and no call counted as served or failed.
    before = figures()
    fake.behave("openai", count=1, chunks=50, chunk_interval_s=0.1)
    assert b"event: delta" in _stream(srv, leave_after_first_delta=True)
    moved_by({"ttft": 1, "cancelled": 1}, before)


def test_no_label_carries_text_token_ip_or_path(served: tuple[Server, Path]) -> None:
    srv, _ = served
    secrets = ("zebra-quartz-words", "tok-9f8e7d-secret", "198.51.100.23", "leak-path-xyz", "127.0.0.1")
    srv.post_json(
        "/api/chat",
        {"message": "zebra-quartz-words", "provider": "echo"},
        Authorization="Bearer tok-9f8e7d-secret",
        **{"X-Forwarded-For": "198.51.100.23"},
    )
    srv.request(
        "GET", "/api/leak-path-xyz?zebra-quartz-words", headers={"Authorization": "Bearer tok-9f8e7d-secret"}
    )
    srv.request("BREW", "/leak-path-xyz")

    def counted() -> str | None:
        text = scrape(srv)
        return text if 'method="other"' in text else None

    text = poll(counted, 5, "the unknown method counted")
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            for value in s.labels.values():
                assert not any(x in value for x in secrets), (s.name, s.labels)
    assert sample(text, "pwachat_http_requests_total", route="other", method="other") >= 1


def test_the_directory_goes_with_the_instance(tmp_path: Path) -> None:
    srv = start_server(tmp_path, WORKERS="2", TMPDIR=str(tmp_path))
    (directory,) = tmp_path.glob("pwachat-metrics-*")
    poll(lambda: len(list(directory.glob("worker-*.bin"))) == 2, 10, "both workers' files")
    # A file is made in the worker's lifespan, before Granian counts the worker as started; a
    # SIGTERM in between leaves Granian waiting on that worker (seen once in CI: killed after 10 s).
    poll(lambda: srv.output().count("Started worker-") == 2, 10, "both workers started")
    stop_server(srv)
    assert srv.proc.returncode == 0
    assert not directory.exists()


# -- the sum itself, in-process -------------------------------------------------------------------


def test_files_are_summed_gauges_over_live_processes_and_other_layouts_ignored(tmp_path: Path) -> None:
    settings = Settings()
    a, b = Metrics(), Metrics()
    a.open(settings, tmp_path)
    b.open(settings, tmp_path)
    for seconds in (0.001, 0.005, 0.02, 3.0):
        a.request("/api/chat", "POST", 200, seconds)
    b.request("/api/chat", "POST", 200, 0.2)
    b.request("/api/chat", "POST", 429, 0.001)
    a.stream_opened()
    b.stream_opened()
    b.stream_opened()
    # A dead worker's file: its counts stay in the sum, its open streams do not.
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    c = Metrics()
    c.open(settings, tmp_path)
    c.request("/api/chat", "POST", 200, 0.05)
    c.stream_opened()
    assert c.mm is not None
    c.mm[16:24] = int(dead.stdout).to_bytes(8, "little")  # the header's pid slot
    # A file of another layout (other models): not summed.
    d = Metrics()
    d.open(Settings.from_mapping({"OPENAI_MODELS": "other-model"}), tmp_path)
    d.request("/api/chat", "POST", 200, 0.05)

    layout = Layout(settings)
    total, live = metrics._read(tmp_path, layout)
    text = render(layout, total, live, redis_up=True)
    assert sample(text, "pwachat_http_requests_total", route="/api/chat", status="200") == 6
    assert sample(text, "pwachat_http_requests_total", route="/api/chat", status="429") == 1
    assert sample(text, "pwachat_streams_active") == 3
    assert sample(text, "pwachat_redis_up") == 1
    count = sample(text, "pwachat_http_request_duration_seconds_count", route="/api/chat")
    assert count == 7
    buckets = {
        s.labels["le"]: s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == "pwachat_http_request_duration_seconds_bucket"
    }
    # le is inclusive: 0.005 falls in the 0.005 bucket; cumulative up to +Inf = count.
    assert buckets["0.005"] == 3 and buckets["0.01"] == 3 and buckets["0.025"] == 4
    assert buckets["0.05"] == 5 and buckets["0.25"] == 6 and buckets["2.5"] == 6 and buckets["5.0"] == 7
    assert buckets["+Inf"] == 7
    total_s = sample(text, "pwachat_http_request_duration_seconds_sum", route="/api/chat")
    assert total_s == pytest.approx(0.001 + 0.005 + 0.02 + 3.0 + 0.2 + 0.001 + 0.05)
    for m in (a, b, c, d):
        m.close()
    # Closed (a worker's lifespan ended): its streams are no longer open, its counts remain.
    total, live = metrics._read(tmp_path, layout)
    text = render(layout, total, live, redis_up=False)
    assert sample(text, "pwachat_streams_active") == 0
    assert sample(text, "pwachat_http_requests_total", route="/api/chat", status="200") == 6


def test_odd_methods_statuses_and_paths_fall_into_bounded_labels() -> None:
    m = Metrics()
    m.request("/api/chat/", "PROPFIND", 418, 0.0)
    m.request("/static/app.js", "GET", 200, 0.0)
    m.request("/x", "GET", 999, 0.0)
    text = render(m.layout, list(m.mv), list(m.mv), redis_up=False)
    assert sample(text, "pwachat_http_requests_total", route="other", method="other", status="4xx") == 1
    assert (
        sample(text, "pwachat_http_requests_total", route="/static/{name}", method="GET", status="200") == 1
    )
    assert sample(text, "pwachat_http_requests_total", route="other", method="GET", status="other") == 1


# -- who may scrape, in-process -------------------------------------------------------------------


def test_a_non_loopback_peer_gets_404(make_client, check_error) -> None:
    resp = make_client(peer="203.0.113.7").get("/metrics")
    check_error(resp, 404, "not_found")


@pytest.mark.parametrize("peer", ["127.0.0.1", "::1", "127.8.9.10"])
def test_a_loopback_peer_gets_the_text_never_rate_limited(make_client, peer: str) -> None:
    client = make_client(peer=peer, RATELIMIT_PER_MINUTE="1")
    for _ in range(3):
        resp = client.get("/metrics")
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/plain; version=0.0.4")
        assert "x-ratelimit-limit" not in resp.headers
    assert set(families(resp.text)) == set(CONTRACT)


def test_metrics_token_is_required_when_set(make_client, check_error) -> None:
    for peer in ("127.0.0.1", "203.0.113.7"):
        client = make_client(peer=peer, METRICS_TOKEN="m-token-1")
        check_error(client.get("/metrics"), 401, "unauthorized")
        check_error(
            client.get("/metrics", headers={"Authorization": "Bearer m-token-2"}), 401, "unauthorized"
        )
        resp = client.get("/metrics", headers={"Authorization": "Bearer m-token-1"})
        assert resp.status_code == 200
        assert "m-token-1" not in resp.text


def test_api_tokens_do_not_open_metrics(make_client, check_error) -> None:
    client = make_client(peer="203.0.113.7", API_TOKENS="api-1")
    check_error(client.get("/metrics", headers={"Authorization": "Bearer api-1"}), 404, "not_found")


def test_no_label_value_outside_the_layout() -> None:
    # Every label value is a fixed string of the layout: nothing a request sends can make a new one.
    layout = Layout(Settings())
    for fam in layout.families.values():
        for labels in fam.series:
            for value in labels:
                assert re.fullmatch(r"[A-Za-z0-9_./{}:-]*", value), (fam.name, value)
