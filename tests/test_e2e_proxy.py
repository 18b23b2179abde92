"""Egress proxies end to end: the real `pwachat serve` process with HTTP_PROXY / HTTPS_PROXY set.

The OpenAI provider's base URL is the fake upstream's plain port (through HTTP_PROXY: absolute-form
requests), Anthropic's its TLS port (through HTTPS_PROXY: a CONNECT tunnel, TLS to the fake
verified against a throwaway CA the server process trusts through SSL_CERT_FILE). The recording
proxy (tests/recording_proxy.py) says what passed through it; the proxy's password must never
appear in what the server logs, nor in its answers.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from fake_upstream import FakeUpstream
from recording_proxy import RecordingProxy
from server import Server, start_server, stop_server

pytestmark = pytest.mark.e2e

OPENAI_KEY = "sk-test-openai"
ANTHROPIC_KEY = "sk-ant-test"
PASSWORD = "pr0xy-s3cret-e2e"


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ssl.SSLContext]:
    import trustme

    ca = trustme.CA()
    ca_file = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    return ca_file, context


@pytest.fixture(scope="module")
def fake(tls_files: tuple[Path, ssl.SSLContext]) -> Iterator[tuple[FakeUpstream, str]]:
    with FakeUpstream(OPENAI_KEY, ANTHROPIC_KEY) as upstream:
        assert upstream._loop is not None and upstream._server is not None
        port = asyncio.run_coroutine_threadsafe(
            upstream._server.add_tls_site(tls_files[1]), upstream._loop
        ).result(10)
        yield upstream, f"https://127.0.0.1:{port}"


def serve(tmp: Path, fake: tuple[FakeUpstream, str], ca_file: Path, proxy_port: int, **env: str) -> Server:
    upstream, tls_url = fake
    proxy = f"http://user:{PASSWORD}@127.0.0.1:{proxy_port}"
    return start_server(
        tmp,
        OPENAI_API_KEY=OPENAI_KEY,
        OPENAI_BASE_URL=upstream.openai_base_url,
        ANTHROPIC_API_KEY=ANTHROPIC_KEY,
        ANTHROPIC_BASE_URL=tls_url,
        HTTP_PROXY=proxy,
        HTTPS_PROXY=proxy,
        SSL_CERT_FILE=str(ca_file),
        UPSTREAM_MAX_RETRIES="0",
        LOG_LEVEL="DEBUG",
        **env,
    )


def logs(srv: Server) -> str:
    return srv.output() + (srv.app_log.read_text(errors="replace") if srv.app_log.exists() else "")


def test_both_providers_answer_through_the_proxy_and_its_password_is_never_logged(
    tmp_path: Path, fake: tuple[FakeUpstream, str], tls_files: tuple[Path, ssl.SSLContext]
) -> None:
    proxy = RecordingProxy().start_in_thread()
    srv = serve(tmp_path, fake, tls_files[0], proxy.port, NO_PROXY="")
    try:
        for provider in ("openai", "claude"):
            status, _, body = srv.post_json("/api/chat", {"message": "hello", "provider": provider})
            assert status == 200, body
            assert json.loads(body)["provider"] == provider
        upstream, tls_url = fake
        plain = upstream.openai_base_url.split("//")[1].split("/")[0]
        lines = [line for line, _ in proxy.seen]
        assert f"POST http://{plain}/v1/chat/completions HTTP/1.1" in lines
        assert f"CONNECT {tls_url.split('//')[1]} HTTP/1.1" in lines
        assert all(h.get("proxy-authorization", "").startswith("Basic ") for _, h in proxy.seen)
        # The provider's own headers went through; the proxy's credentials did not reach it.
        for record in upstream.requests():
            assert "proxy-authorization" not in {k.lower() for k in record.get("headers", {})}
        stream_status, _, stream = srv.request(
            "POST",
            "/api/chat/stream",
            json.dumps({"message": "hello", "provider": "claude"}).encode(),
            {"Content-Type": "application/json"},
        )
        assert stream_status == 200 and b"event: done" in stream
    finally:
        stop_server(srv)
        proxy.stop_thread()
    assert PASSWORD not in logs(srv)


def test_no_proxy_reaches_the_provider_directly(
    tmp_path: Path, fake: tuple[FakeUpstream, str], tls_files: tuple[Path, ssl.SSLContext]
) -> None:
    proxy = RecordingProxy().start_in_thread()
    srv = serve(tmp_path, fake, tls_files[0], proxy.port, no_proxy="127.0.0.1")
    try:
        for provider in ("openai", "claude"):
            status, _, body = srv.post_json("/api/chat", {"message": "hello", "provider": provider})
            assert status == 200, body
        assert proxy.seen == []
    finally:
        stop_server(srv)
        proxy.stop_thread()


def test_a_proxy_that_refuses_is_an_upstream_error_without_the_password(
    tmp_path: Path, fake: tuple[FakeUpstream, str], tls_files: tuple[Path, ssl.SSLContext]
) -> None:
    proxy = RecordingProxy(refuse=407).start_in_thread()
    srv = serve(tmp_path, fake, tls_files[0], proxy.port)
    try:
        for provider in ("openai", "claude"):
            status, _, body = srv.post_json("/api/chat", {"message": "hello", "provider": provider})
            assert status == 502, body
            assert json.loads(body)["error"]["code"] == "upstream_error"
            assert PASSWORD not in body.decode()
        assert len(proxy.seen) == 2
    finally:
        stop_server(srv)
        proxy.stop_thread()
    assert PASSWORD not in logs(srv)
