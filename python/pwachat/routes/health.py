"""GET /api/health, /api/health/live, /api/health/ready: never rate-limited, never need a token."""

from __future__ import annotations

import asyncio
import os
from typing import Literal

from litestar import get
from litestar.datastructures import State

from pwachat import __version__
from pwachat.errors import ProviderNotConfigured, documented
from pwachat.relay import open_streams
from pwachat.schemas import HealthResponse, ProviderHealth, RateLimitHealth, RuntimeHealth, StatusResponse
from pwachat.services import Services

__all__ = ["health", "live", "ready"]


@get("/health", summary="Health and configuration summary", **documented())
async def health(state: State) -> HealthResponse:
    svc: Services = state.services
    settings = svc.settings
    serving = svc.providers.serving
    providers = {
        name: ProviderHealth(
            configured=name in serving,
            models=len(models) if name in serving else 0,
            status=_status(svc, name),
        )
        for name, models in svc.providers.models.items()
    }
    redis = await svc.limiter.redis_state()
    # A real provider: any that serves but the offline echo.
    real = any(svc.providers.specs[name].format != "echo" for name in serving)
    # A provider skipped for its fallback is served around, as limits are kept per process while
    # Redis is away: the answers still come, and the instance says it is degraded.
    skipped = any(health.status == "degraded" for health in providers.values())
    return HealthResponse(
        status="ok" if real and redis != "unavailable" and not skipped else "degraded",
        version=__version__,
        environment=settings.app_env,
        providers=providers,
        rate_limit=RateLimitHealth(backend=svc.limiter.name, redis=redis),
        runtime=RuntimeHealth(
            pid=os.getpid(),
            tasks=len(asyncio.all_tasks()),
            open_streams=open_streams(),
            kept_streams=len(svc.streams.logs),
            kept_stream_bytes=svc.streams.kept_bytes(),
        ),
    )


def _status(svc: Services, name: str) -> Literal["ok", "degraded", "disabled"]:
    if name not in svc.providers.serving:
        return "disabled"
    return "degraded" if svc.providers.degraded(name) else "ok"


@get("/health/live", summary="Liveness: the process serves", **documented())
async def live() -> StatusResponse:
    return StatusResponse("ok")


@get(
    "/health/ready",
    summary="Readiness: at least one provider can serve",
    **documented(ProviderNotConfigured),
)
async def ready(state: State) -> StatusResponse:
    svc: Services = state.services
    if not svc.providers.serving:
        raise ProviderNotConfigured()
    return StatusResponse("ok")
