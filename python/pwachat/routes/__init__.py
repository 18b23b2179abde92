"""One module per resource; `api_router` is everything under /api."""

from __future__ import annotations

from litestar import Router

from pwachat.routes.chat import chat, chat_stream
from pwachat.routes.health import health, live, ready
from pwachat.routes.models import models
from pwachat.routes.ratelimit import rate_limit

__all__ = ["api_router"]


def api_router() -> Router:
    return Router(path="/api", route_handlers=[health, live, ready, models, chat, chat_stream, rate_limit])
