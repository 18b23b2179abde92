"""The reference PWA's files: served by the backend, under a strict CSP, nothing inline."""

from __future__ import annotations

import json
import re

import pytest

from pwachat.routes.pages import PAGE_CSP

FILES = {
    "/": "text/html",
    "/static/app.js": "text/javascript",
    "/static/app.css": "text/css",
    "/static/icon.svg": "image/svg+xml",
    "/static/icon-192.png": "image/png",
    "/static/icon-512.png": "image/png",
    "/sw.js": "text/javascript",
    "/manifest.webmanifest": "application/manifest+json",
}


@pytest.mark.parametrize(("path", "ctype"), FILES.items())
def test_files_are_served_with_the_page_policy(client, path: str, ctype: str) -> None:
    resp = client.get(path)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith(ctype)
    assert resp.headers["content-security-policy"] == PAGE_CSP
    assert resp.headers["cache-control"] == "no-cache"
    assert resp.headers["x-content-type-options"] == "nosniff"
    assert resp.content


def test_the_policy_allows_nothing_inline_and_no_eval() -> None:
    assert "unsafe-inline" not in PAGE_CSP and "unsafe-eval" not in PAGE_CSP
    assert "frame-ancestors 'none'" in PAGE_CSP and "default-src 'self'" in PAGE_CSP


def test_the_page_has_no_inline_script_or_style(client) -> None:
    html = client.get("/").text
    assert re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html) is None, "inline <script>"
    assert "<style" not in html and " style=" not in html
    assert re.search(r"\son[a-z]+=", html) is None, "inline event handler"
    assert 'src="/static/app.js"' in html and 'href="/manifest.webmanifest"' in html


def test_the_manifest_makes_it_installable(client) -> None:
    manifest = json.loads(client.get("/manifest.webmanifest").content)
    assert manifest["start_url"] == "/" and manifest["display"] in ("standalone", "fullscreen")
    sizes = {icon.get("sizes") for icon in manifest["icons"]}
    assert {"192x192", "512x512"} <= sizes
    for icon in manifest["icons"]:
        assert client.get(icon["src"]).status_code == 200


def test_the_service_worker_never_touches_the_api(client) -> None:
    sw = client.get("/sw.js").text
    assert "/api/" in sw  # it names the API only to leave it alone


@pytest.mark.parametrize("path", ["/static/nope.js", "/static/..%2Fapp.py", "/static/", "/index.html"])
def test_unknown_files_are_json_404(client, check_error, path: str) -> None:
    check_error(client.get(path), 404, "not_found")
