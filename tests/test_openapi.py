"""The served OpenAPI document describes the real API: schemathesis, with every check, against the real
`pwachat serve` process, finds nothing; and the document follows the app's settings and catalogue.

schemathesis reads `/api/schema/openapi.json` from the server, generates requests from it (valid
ones and ones the document says must be refused), sends them, and checks each answer against the
document: its status is documented, its body (each SSE event of a stream, too) matches the
documented schema for that status and media type, the documented required headers are there and
well formed, what the document says is invalid is refused (4xx) and what it says is valid is
accepted (2xx), an undocumented method is 405 with `Allow`, and nothing is a 5xx. So a document
that lies (Litestar's `{status_code, detail}` instead of our envelope, a missing status, a bound
that is not there) fails here, and so does a server that departs from the document generated from
its own code. The one failure dropped, and why, is in tests/schemathesis_hooks.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from schemathesis.config import SchemathesisWarning

from pwachat._native import sanitize
from pwachat.errors import InternalError
from pwachat.routes.chat import CHAT_ERRORS
from pwachat.schemas import VISIBLE_TEXT
from server import start_server, stop_server

HERE = Path(__file__).resolve().parent
SCHEMATHESIS = [sys.executable, "-m", "schemathesis.cli"]
MAX_EXAMPLES = 300  # per operation; the whole run takes about 10 s on 2 cores
# High limits: a 429 is documented where it applies, but a run dominated by them tests nothing else.
#: The documented paths that need the token when API_TOKENS is set (every one but health's).
GUARDED_PATHS = {
    "/api/models",
    "/api/chat",
    "/api/chat/stream",
    "/api/chat/stream/{stream_id}",
    "/api/chat/stream/{stream_id}/stop",
    "/api/rate-limit",
}
HIGH_LIMITS = {f"RATELIMIT_PER_{w}": "1000000" for w in ("MINUTE", "HOUR", "DAY")}


def _schemathesis(
    port: int, cwd: Path, *extra: str, max_examples: int = MAX_EXAMPLES
) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    run = subprocess.run(
        [
            *SCHEMATHESIS,
            "--no-color",
            "run",
            f"http://127.0.0.1:{port}/api/schema/openapi.json",
            "--checks",
            "all",
            "--max-examples",
            str(max_examples),
            # Deterministic: Hypothesis derandomised (no seed is used then, and no example database
            # is carried over from an earlier run), one worker (no interleaving).
            "--generation-deterministic",
            "--workers",
            "1",
            "--request-timeout",
            "10",
            # The report shows the requests as sent (a field named `*tokens` is masked otherwise).
            "--output-sanitize",
            "false",
            # Every warning but `missing_test_data`: a stream's id (resume, stop) is unguessable
            # and exists only while a stream runs, so schemathesis's ids are rightly all 404s
            # (tests/test_e2e_resume.py covers those routes with real streams).
            "--warnings",
            ",".join(w.value for w in SchemathesisWarning if w is not SchemathesisWarning.MISSING_TEST_DATA),
            *extra,
        ],
        cwd=cwd,
        env={
            **os.environ,
            "SCHEMATHESIS_TELEMETRY": "false",
            "SCHEMATHESIS_HOOKS": "schemathesis_hooks",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])),
        },
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    return run, time.monotonic() - started


def _assert_no_issue(run: subprocess.CompletedProcess[str], elapsed: float) -> None:
    report = f"{run.stdout}\n{run.stderr}"
    print(f"schemathesis ran for {elapsed:.1f} s\n{report}")
    assert run.returncode == 0, report
    assert "No issues found" in run.stdout, report


@pytest.mark.e2e
def test_schemathesis_finds_no_failure(tmp_path: Path) -> None:
    server = start_server(tmp_path, ECHO_PROVIDER="on", **HIGH_LIMITS)
    try:
        run, elapsed = _schemathesis(server.port, tmp_path)
    finally:
        stop_server(server)
    _assert_no_issue(run, elapsed)


@pytest.mark.e2e
def test_schemathesis_with_api_tokens_finds_no_failure(tmp_path: Path) -> None:
    """With API_TOKENS the document requires the bearer token where the server does: schemathesis
    sends the token, and also leaves it out or spoils it, expecting a documented 401 (a route that
    ignored the token would fail here)."""
    server = start_server(tmp_path, ECHO_PROVIDER="on", API_TOKENS="st-token", **HIGH_LIMITS)
    try:
        auth = ("--header", "Authorization: Bearer st-token")
        run, elapsed = _schemathesis(server.port, tmp_path, *auth, max_examples=50)
    finally:
        stop_server(server)
    _assert_no_issue(run, elapsed)


# --------------------------------------------------------------------------------------------
# The document, from the app's settings and the catalogue
# --------------------------------------------------------------------------------------------


def _document(make_client, **env) -> dict:
    resp = make_client(**env).get("/api/schema/openapi.json")
    assert resp.status_code == 200
    return resp.json()


def test_visible_text_pattern_agrees_with_the_sanitiser_on_every_code_point() -> None:
    visible = re.compile(VISIBLE_TEXT)
    disagree = [
        hex(cp)
        for cp in range(sys.maxunicode + 1)
        if not 0xD800 <= cp <= 0xDFFF and bool(visible.search(chr(cp))) != bool(sanitize(chr(cp)))
    ]
    assert disagree == []


def test_the_request_body_carries_the_apps_limits(make_client) -> None:
    doc = _document(
        make_client,
        MAX_MESSAGE_CHARS="12",
        MAX_HISTORY_MESSAGES="0",
        MAX_TOKENS="64",
        ECHO_PROVIDER="off",
        ANTHROPIC_API_KEY="sk-ant-test",
        ANTHROPIC_BASE_URL="http://127.0.0.1:9",
        ANTHROPIC_MODELS="c-1,c-2",
    )
    schemas = doc["components"]["schemas"]
    body = doc["paths"]["/api/chat"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/ChatRequest"}
    request = schemas["ChatRequest"]
    assert request["additionalProperties"] is False and request["required"] == ["message"]
    fields = request["properties"]
    assert fields["message"]["maxLength"] == 12 and fields["message"]["minLength"] == 1
    assert fields["message"]["pattern"] == VISIBLE_TEXT
    assert fields["history"]["maxItems"] == 0  # a zero bound survives Litestar's truth test
    assert (fields["temperature"]["minimum"], fields["temperature"]["maximum"]) == (0, 2)
    assert (fields["max_tokens"]["minimum"], fields["max_tokens"]["maximum"]) == (1, 64)
    # Only the providers that can serve, with their aliases; `null` is absent.
    assert fields["provider"]["enum"] == ["claude", "anthropic", None]
    assert fields["model"]["enum"] == ["c-1", "c-2", None]
    item = schemas["HistoryItem"]
    assert item["additionalProperties"] is False
    assert item["properties"]["content"]["maxLength"] == 12


def test_every_error_is_the_envelope_with_its_codes_and_headers(make_client) -> None:
    doc = _document(make_client)
    for path in ("/api/chat", "/api/chat/stream"):
        responses = doc["paths"][path]["post"]["responses"]
        statuses = {str(cls.status) for cls in (*CHAT_ERRORS, InternalError)}
        assert set(responses) == {"200", *statuses}
        for status in statuses:
            content = responses[status]["content"]["application/json"]
            assert content["schema"] == {"$ref": "#/components/schemas/ErrorBody"}
            codes = {e["value"]["error"]["code"] for e in content["examples"].values()}
            assert codes == {cls.code for cls in (*CHAT_ERRORS, InternalError) if str(cls.status) == status}
            assert responses[status]["headers"]["X-Request-ID"]["required"] is True
        assert responses["401"]["headers"]["WWW-Authenticate"]["required"] is True
        limited = responses["429"]["headers"]
        for name in ("Retry-After", "X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset"):
            assert limited[name]["required"] is True and limited[name]["schema"]["type"] == "integer"
        for name in ("RateLimit-Policy", "RateLimit"):
            assert limited[name]["required"] is True
        # Admitted answers carry the rate-limit headers; one refused before the limit does not.
        assert responses["200"]["headers"]["RateLimit"]["required"] is True
        assert responses["502"]["headers"]["RateLimit"]["required"] is True
        assert "RateLimit" not in responses["400"]["headers"]
        # upstream_rate_limited passes the provider's Retry-After on only when it is usable.
        assert responses["503"]["headers"]["Retry-After"]["required"] is False
    error_info = doc["components"]["schemas"]["ErrorInfo"]
    assert set(error_info["properties"]) == {"code", "message", "request_id", "details"}
    assert "status_code" not in str(doc)  # no trace of Litestar's own error body


def test_the_stream_documents_its_events(make_client) -> None:
    doc = _document(make_client)
    content = doc["paths"]["/api/chat/stream"]["post"]["responses"]["200"]["content"]
    variants = content["text/event-stream"]["schema"]["oneOf"]
    names = [ref["$ref"].rsplit("/", 1)[-1] for ref in variants]
    events = {doc["components"]["schemas"][n]["properties"]["event"]["const"]: n for n in names}
    assert set(events) == {"start", "delta", "done", "error"}
    done = doc["components"]["schemas"][events["done"]]["properties"]["data"]
    assert done["contentMediaType"] == "application/json"
    assert set(done["contentSchema"]["properties"]) == {"finish_reason", "usage"}
    assert "$ref" not in str(done["contentSchema"])  # inlined: resolvable where it stands


def test_the_token_is_documented_where_it_is_needed(make_client) -> None:
    doc = _document(make_client)
    assert "securitySchemes" not in doc["components"]  # no API_TOKENS: nothing to send
    client = make_client(API_TOKENS="alpha")
    doc = client.get("/api/schema/openapi.json", headers={"Authorization": "Bearer alpha"}).json()
    assert doc["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "One of API_TOKENS",
    }
    needs = {path for path, item in doc["paths"].items() for op in item.values() if op.get("security")}
    assert needs == GUARDED_PATHS


def test_the_schema_does_not_list_its_own_paths(make_client) -> None:
    doc = _document(make_client)
    assert not [p for p in doc["paths"] if p.startswith("/api/schema")]
    assert set(doc["paths"]) == {"/api/health", "/api/health/live", "/api/health/ready", *GUARDED_PATHS}
