"""The reference chat PWA: `/` (the page), `/static/*` (its files), `/sw.js`, `/manifest.webmanifest`.

The files are few and small, so they are read once and served from memory, by name from a fixed
table (no path is ever joined from a request). The page has its own Content-Security-Policy, as
tight as the page allows: scripts, styles, fetches, the manifest and the worker from this origin
only, nothing inline, no eval. The service worker gets the same policy (a worker's own response
CSP governs its fetches). Everything is revalidated on each load (`no-cache`): the service worker,
not the HTTP cache, is what keeps the shell available offline.
"""

from __future__ import annotations

from importlib.resources import files

from litestar import Response, Router, get
from litestar.exceptions import NotFoundException
from litestar.params import FromPath

__all__ = ["PAGE_CSP", "pages_router"]

PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; manifest-src 'self'; worker-src 'self'; frame-ancestors 'none'; "
    "base-uri 'none'; form-action 'none'"
)

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".webmanifest": "application/manifest+json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}


def _load() -> dict[str, tuple[bytes, str]]:
    root = files("pwachat") / "static"
    out = {}
    for entry in root.iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1]
        if entry.is_file() and suffix in _TYPES:
            out[entry.name] = (entry.read_bytes(), _TYPES[suffix])
    return out


def pages_router() -> Router:
    table = _load()
    headers = {"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-cache"}

    def serve(name: str) -> Response[bytes]:
        found = table.get(name)
        if found is None:
            raise NotFoundException()
        body, media_type = found
        return Response(body, media_type=media_type, headers=headers)

    @get("/", include_in_schema=False, sync_to_thread=False)
    def page() -> Response[bytes]:
        return serve("index.html")

    @get("/static/{name:str}", include_in_schema=False, sync_to_thread=False)
    def static(name: FromPath[str]) -> Response[bytes]:
        return serve(name)

    @get("/sw.js", include_in_schema=False, sync_to_thread=False)
    def worker() -> Response[bytes]:
        return serve("sw.js")

    @get("/manifest.webmanifest", include_in_schema=False, sync_to_thread=False)
    def manifest() -> Response[bytes]:
        return serve("manifest.webmanifest")

    return Router(path="/", route_handlers=[page, static, worker, manifest])
