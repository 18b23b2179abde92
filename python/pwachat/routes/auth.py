"""Bearer-token check shared by every /api route but health (which load balancers must reach)."""

from __future__ import annotations

from typing import Any

from pwachat.security import Unauthorized, bearer_token, check_token
from pwachat.services import Services

__all__ = ["authorize", "token_guard"]


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
