"""Who the caller is and how it connected: the socket peer, or what a trusted proxy says of it."""

from __future__ import annotations

from typing import Any

__all__ = ["client_ip"]


def client_ip(scope: dict[str, Any]) -> str:
    """The caller's address: the socket peer, or behind a trusted proxy what the proxy-header
    reading (installed in `app.py`) put in its place."""
    client = scope.get("client")
    return client[0] if client else "unknown"
