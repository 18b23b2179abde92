"""One module per resource; `api_router` is everything under /api."""

from __future__ import annotations

from litestar import Router

from pwachat.routes.chat import chat_routes
from pwachat.routes.health import health, live, ready
from pwachat.routes.models import models
from pwachat.routes.ratelimit import rate_limit
from pwachat.settings import Settings

__all__ = ["api_router"]


def api_router(settings: Settings) -> Router:
    return Router(
        path="/api", route_handlers=[health, live, ready, models, *chat_routes(settings), rate_limit]
    )
