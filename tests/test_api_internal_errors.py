"""A bug anywhere answers `500 internal_error` in the envelope, logged once with its trace.

A Rust panic in the extension surfaces as PyO3's `PanicException`, a `BaseException` that every
`except Exception` on the way (Litestar's exception handlers among them) lets pass. The fault is
injected into our own limiter object (the native limiter it wraps cannot be made to panic on
purpose), for a route served by the chat fast path and one served by Litestar's router.
"""

from __future__ import annotations

import logging

import pytest

from pwachat._native import PanicException


class PanickingLimiter:
    """Stands in for the rate-limit backend; every check hits a 'bug' in the extension."""

    name = "memory"

    async def hit(self, key: str):
        raise PanicException("index out of bounds: the len is 3 but the index is 7")

    peek = hit

    async def redis_state(self) -> str:
        return "disabled"

    async def aclose(self) -> None:
        return None


class BrokenLimiter(PanickingLimiter):
    async def hit(self, key: str):
        raise KeyError("a plain Python bug")

    peek = hit


def _with(limiter_cls):
    def setup(app) -> None:
        def swap(app) -> None:
            app.state.services.limiter = limiter_cls()

        app.on_startup.append(swap)

    return setup


@pytest.mark.parametrize("limiter_cls", [PanickingLimiter, BrokenLimiter])
@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/api/chat", {"message": "hi"}),
        ("POST", "/api/chat/stream", {"message": "hi"}),
        ("POST", "/api/chat/", {"message": "hi"}),  # the same handler through Litestar's router
        ("GET", "/api/rate-limit", None),
    ],
)
def test_a_bug_is_a_500_envelope_logged_once(
    make_client, check_error, caplog, limiter_cls, method: str, path: str, body
) -> None:
    client = make_client(setup=_with(limiter_cls))
    with caplog.at_level(logging.ERROR, logger="pwachat"):
        resp = client.request(method, path, json=body)
    err = check_error(
        resp, 500, "internal_error", absent=("index out of bounds", "plain Python bug", "KeyError")
    )
    assert err["message"] == "Internal server error"
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert errors[0].exc_info is not None and errors[0].request_id == resp.headers["x-request-id"]
    # The server goes on serving.
    assert client.get("/api/health/live").status_code == 200
