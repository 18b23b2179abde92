"""GET /api/models: the providers that can serve now, each with its default model first."""

from __future__ import annotations

from typing import Any

from litestar import Request, get
from litestar.datastructures import State

from pwachat.auth import authorize
from pwachat.errors import Unauthorized, documented
from pwachat.schemas import ModelInfo, ModelsResponse
from pwachat.services import Services

__all__ = ["models"]


@get("/models", summary="Providers and models offered", **documented(Unauthorized))
async def models(request: Request[Any, Any, Any], state: State) -> ModelsResponse:
    svc: Services = state.services
    authorize(request.scope, svc)
    # Each with its provider's label (PROVIDERS' N_LABEL, or the built-in's), which the PWA's picker shows.
    labels = svc.providers.labels
    out = [
        ModelInfo(id=model, provider=name, default=i == 0, label=labels[name])
        for name, provider in svc.providers.serving.items()
        for i, model in enumerate(provider.models)
    ]
    return ModelsResponse(default_provider=svc.providers.default, models=out)
