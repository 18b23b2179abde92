"""`create_app(settings)`: builds the Litestar app; everything with a lifetime is made in `lifespan`."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from litestar import Litestar, Response, Router
from litestar.exceptions import NotFoundException
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin
from litestar.openapi.spec import Components

from pwachat import __version__, drain, metrics, relay
from pwachat.auth import token_guard
from pwachat.edge import EdgeMiddleware
from pwachat.errors import as_api_error, exception_handlers, send_error
from pwachat.forwarded import ForwardedHeaders
from pwachat.logging import setup_logging
from pwachat.providers import build_providers
from pwachat.ratelimit import create_backend, policy_header
from pwachat.redis_streams import create_mirror
from pwachat.routes import BEARER_SCHEMES, api_router
from pwachat.routes.chat import HOT_ROUTES
from pwachat.routes.metrics import metrics_endpoint
from pwachat.routes.pages import pages_router
from pwachat.services import Services
from pwachat.settings import Settings
from pwachat.streams import Streams

__all__ = ["create_app", "create_app_from_env"]


def create_app(settings: Settings | None = None) -> Litestar:
    settings = settings if settings is not None else Settings.from_env()
    setup_logging(settings)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        providers = build_providers(settings)
        limiter = create_backend(settings)
        await limiter.start()
        mirror = create_mirror(settings)
        streams = Streams(settings, mirror)
        if mirror is not None:
            await mirror.start(streams)
        app.state.services = Services(
            settings=settings,
            providers=providers,
            limiter=limiter,
            policy=policy_header(settings),
            tokens=tuple(t.encode() for t in settings.api_tokens),
            streams=streams,
        )
        # SIGTERM: new requests 503, running streams get SHUTDOWN_GRACE_S (in a Granian worker;
        # see drain.py). The lifespan's end comes only once every request has ended.
        undrain = drain.install(settings.shutdown_grace_s, relay.end_streams, relay.open_streams)
        try:
            yield
        finally:
            undrain()
            await providers.aclose()
            streams.close()
            if mirror is not None:
                await mirror.aclose()
            await limiter.aclose()

    app = Litestar(
        route_handlers=[api_router(settings), pages_router(), metrics_endpoint],
        # This worker's metrics file first (pwachat/metrics.py), so that it outlives the services.
        lifespan=[metrics.lifespan(settings), lifespan],
        exception_handlers=exception_handlers,
        request_max_body_size=settings.max_body_bytes,
        # JSON only: the HTML viewers load scripts from CDNs, which the API's CSP (rightly) forbids.
        openapi_config=OpenAPIConfig(
            title="pwachat",
            version=__version__,
            path="/api/schema",
            render_plugins=[JsonRenderPlugin()],
            components=Components(security_schemes=BEARER_SCHEMES if settings.api_tokens else None),
            # Not in the document itself: Litestar would list the schema's own paths with the
            # wrong media types (and a catch-all that answers only 404s).
            openapi_router=Router(
                "/api/schema",
                route_handlers=[],
                after_request=_schema_404_as_json,
                guards=[token_guard],
                include_in_schema=False,
            ),
        ),
        debug=False,
        logging_config=None,  # ours (pwachat.logging) is already in place
    )
    # The request path, outermost first: the proxy headers (who the caller is), the edge (request
    # id, security headers, CORS, the HTTPS rule, the access line: outside the router, so that
    # 404/405s and CORS answers get them too), the chat fast path, then Litestar's router.
    app.asgi_handler = EdgeMiddleware(ChatFastPath(app.asgi_handler), settings)
    if settings.trusted_proxies:
        # Outermost: from a trusted peer only, X-Forwarded-For names the client and
        # X-Forwarded-Proto the scheme (for the production HTTPS rule), each on its own.
        app.asgi_handler = ForwardedHeaders(app.asgi_handler, settings.trusted_proxies)
    return app


class ChatFastPath:
    """`POST /api/chat` and `/api/chat/stream` straight to their answers (`routes/chat.py:
    HOT_ROUTES`), everything else to Litestar's router.

    Litestar's router, request object and exception middleware cost about a third of the Python
    time of a whole /api/chat request (py-spy), on the two routes that carry the load, which need
    none of them: their checks are ours (`prepare`), their answers bare ASGI apps, their errors
    the same envelope through the same mapping (`errors.as_api_error`) as the router's. Every
    check and the provider's first answer happen before the answer app sends anything, so only
    that step answers errors here; a failure once the answer is under way goes up as it would
    from the router. The Litestar handlers run the same functions (the OpenAPI document, other
    spellings of the path)."""

    __slots__ = ("router",)

    def __init__(self, router: Any) -> None:
        self.router = router

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        answer_for = HOT_ROUTES.get(scope["path"]) if scope.get("method") == "POST" else None
        if answer_for is None:
            await self.router(scope, receive, send)
            return
        try:
            answer = await answer_for(scope, receive, scope["app"].state.services)
        except Exception as exc:
            await send_error(send, as_api_error(exc, scope), scope)
            return
        await answer(scope, receive, send)


def _schema_404_as_json(response: Response) -> Response:
    # Litestar answers unknown schema paths with an HTML page; every error here is the JSON envelope.
    if response.status_code == 404:
        raise NotFoundException()
    return response


def create_app_from_env() -> Litestar:
    """The factory Granian calls in each worker process."""
    settings = Settings.from_env()
    if settings.provider_sdk_config or not settings.needs_sdk:
        # Litestar loads its pydantic plugins whenever pydantic can be imported (the provider SDKs
        # bring it along); this app has no pydantic models, and a worker that never imports the SDKs
        # (pwachat/sdk_config.py) saves the 8 MB. Only then: without the hand-off the SDKs are imported.
        sys.modules.setdefault("pydantic", None)  # type: ignore[arg-type]
    return create_app(settings)
