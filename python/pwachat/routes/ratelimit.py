"""GET /api/rate-limit: the caller's own quota and token budget, read from the state the limiter uses."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, get
from litestar.datastructures import State

from pwachat.auth import authorize
from pwachat.errors import Unauthorized, documented
from pwachat.forwarded import client_ip
from pwachat.ratelimit import caller_key
from pwachat.schemas import RateLimitResponse, TokenCounts, WindowCounts
from pwachat.services import Services

__all__ = ["rate_limit"]


@get(
    "/rate-limit",
    summary="The caller's rate-limit state (not itself limited)",
    **documented(Unauthorized),
)
async def rate_limit(request: Request[Any, Any, Any], state: State) -> Response[RateLimitResponse]:
    svc: Services = state.services
    token = authorize(request.scope, svc)
    decision, verdict = await svc.limiter.view(caller_key(client_ip(request.scope), token))
    w = decision.windows
    budget = None if verdict is None else verdict.decision
    body = RateLimitResponse(
        backend=svc.limiter.name,
        limits=WindowCounts(w[0].limit, w[1].limit, w[2].limit),
        remaining=WindowCounts(w[0].remaining, w[1].remaining, w[2].remaining),
        reset_s=WindowCounts(w[0].reset_s, w[1].reset_s, w[2].reset_s),
        tokens=None if budget is None else TokenCounts(budget.limit, budget.remaining, budget.reset_s),
    )
    return Response(body)
