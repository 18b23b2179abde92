"""One module per resource; `api_router` is everything under /api."""

from __future__ import annotations

from litestar import Router
from litestar.openapi.spec import SecurityScheme

from pwachat.routes.chat import chat_routes
from pwachat.routes.health import health, live, ready
from pwachat.routes.models import models
from pwachat.routes.ratelimit import rate_limit
from pwachat.routes.streams import resume_stream, stop_stream
from pwachat.settings import Settings

__all__ = ["BEARER_SCHEMES", "api_router"]

#: The OpenAPI document's bearer scheme: declared (`app.py`) and required here when API_TOKENS is set.
BEARER_SCHEMES = {"bearer": SecurityScheme(type="http", scheme="bearer", description="One of API_TOKENS")}


def api_router(settings: Settings) -> Router:
    # Health never needs the token (load balancers must reach it); the rest does when API_TOKENS is
    # set (`auth.authorize`), which the document says with a security requirement on them.
    guarded = Router(
        path="/",
        route_handlers=[models, *chat_routes(settings), resume_stream, stop_stream, rate_limit],
        security=[{"bearer": []}] if settings.api_tokens else None,
    )
    return Router(path="/api", route_handlers=[health, live, ready, guarded])
