"""pwachat: the backend a chat PWA talks to."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Settings", "__version__", "create_app"]


def __getattr__(name: str):  # lazy, so that `import pwachat` stays cheap for the CLI and the stubs
    if name == "create_app":
        from pwachat.app import create_app

        return create_app
    if name == "Settings":
        from pwachat.settings import Settings

        return Settings
    raise AttributeError(name)
