"""Bearer tokens (`API_TOKENS`): every /api route but health, which load balancers must reach."""

from __future__ import annotations

import hmac
from typing import Any

from pwachat.errors import Unauthorized
from pwachat.services import Services

__all__ = ["authorize", "bearer_token", "check_token", "token_guard"]


def bearer_token(scope: dict[str, Any]) -> str | None:
    value = None
    for key, raw in scope["headers"]:
        if key == b"authorization":
            value = raw
            break
    if not value:
        return None
    scheme, _, token = value.decode("latin-1").strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def check_token(token: str | None, accepted: tuple[bytes, ...]) -> bool:
    if token is None:
        return False
    candidate = token.encode("utf-8", "surrogateescape")
    # Compare against every accepted token so the time taken does not tell which one was close.
    found = False
    for good in accepted:
        found |= hmac.compare_digest(candidate, good)
    return found


def authorize(scope: dict[str, Any], svc: Services) -> str | None:
    """The caller's token when `API_TOKENS` is set (401 if missing or wrong), else None."""
    if not svc.tokens:
        return None
    token = bearer_token(scope)
    if not check_token(token, svc.tokens):
        raise Unauthorized()
    return token


def token_guard(connection: Any, _handler: Any) -> None:
    """The same check as a Litestar guard, for routers whose handlers we do not write (the schema)."""
    authorize(connection.scope, connection.app.state.services)
