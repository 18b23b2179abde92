"""`create_app(settings)`: builds the Litestar app; everything with a lifetime is made in `lifespan`."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from granian.utils.proxies import wrap_asgi_with_proxy_headers
from litestar import Litestar, Response, Router
from litestar.exceptions import NotFoundException
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin

from pwachat import __version__
from pwachat.errors import exception_handlers
from pwachat.logging import setup_logging
from pwachat.providers import build_providers
from pwachat.ratelimit import create_backend, policy_header
from pwachat.routes import api_router
from pwachat.routes.auth import token_guard
from pwachat.routes.pages import pages_router
from pwachat.security import EdgeMiddleware
from pwachat.services import Services
from pwachat.settings import Settings

__all__ = ["create_app", "create_app_from_env"]


def create_app(settings: Settings | None = None) -> Litestar:
    settings = settings if settings is not None else Settings.from_env()
    setup_logging(settings)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        providers = build_providers(settings)
        limiter = create_backend(settings)
        await limiter.start()
        app.state.services = Services(
            settings=settings,
            providers=providers,
            limiter=limiter,
            policy=policy_header(settings),
            tokens=tuple(t.encode() for t in settings.api_tokens),
        )
        try:
            yield
        finally:
            await providers.aclose()
            await limiter.aclose()

    app = Litestar(
        route_handlers=[api_router(), pages_router()],
        lifespan=[lifespan],
        exception_handlers=exception_handlers,
        request_max_body_size=settings.max_body_bytes,
        # JSON only: the HTML viewers load scripts from CDNs, which the API's CSP (rightly) forbids.
        openapi_config=OpenAPIConfig(
            title="pwachat",
            version=__version__,
            path="/api/schema",
            render_plugins=[JsonRenderPlugin()],
            openapi_router=Router(
                "/api/schema", route_handlers=[], after_request=_schema_404_as_json, guards=[token_guard]
            ),
        ),
        debug=False,
        logging_config=None,  # ours (pwachat.logging) is already in place
    )
    # Outside the router on purpose: 404/405s and CORS answers get the request id, the security
    # headers, CORS, the HTTPS rule and the access log line too (route middleware only sees routed
    # requests).
    app.asgi_handler = EdgeMiddleware(app.asgi_handler, settings)
    if settings.trusted_proxies:
        # Granian's proxy-header support, outermost: from a trusted peer only, the right-most
        # X-Forwarded-For address that is not itself trusted becomes the client, and
        # X-Forwarded-Proto the scheme (for the production HTTPS rule).
        app.asgi_handler = wrap_asgi_with_proxy_headers(app.asgi_handler, list(settings.trusted_proxies))
    return app


def _schema_404_as_json(response: Response) -> Response:
    # Litestar answers unknown schema paths with an HTML page; every error here is the JSON envelope.
    if response.status_code == 404:
        raise NotFoundException()
    return response


def create_app_from_env() -> Litestar:
    """The factory Granian calls in each worker process."""
    settings = Settings.from_env()
    if settings.provider_sdk_config or not (settings.openai_api_key or settings.anthropic_api_key):
        # Litestar loads its pydantic plugins whenever pydantic can be imported (the provider SDKs
        # bring it along); this app has no pydantic models, and a worker that never imports the SDKs
        # (pwachat/sdk_config.py) saves the 8 MB. Only then: without the hand-off the SDKs are imported.
        sys.modules.setdefault("pydantic", None)  # type: ignore[arg-type]
    return create_app(settings)
