"""GET /metrics: the instance's Prometheus text (pwachat/metrics.py sums every worker's counts).

Never rate-limited, never behind API_TOKENS: with METRICS_TOKEN set it needs that bearer token
(401 otherwise), and without one it answers loopback peers only, 404 `not_found` to anyone else, as
if there were no such route. The peer is the caller as `forwarded.py` resolved it, so a request
relayed by a trusted proxy on the same host counts as where it came from, not as loopback.
"""

from __future__ import annotations

import ipaddress

from litestar import Request, Response, get
from litestar.datastructures import State

from pwachat import metrics
from pwachat.auth import bearer_token, check_token
from pwachat.errors import NotFound, Unauthorized
from pwachat.forwarded import client_ip
from pwachat.services import Services

__all__ = ["CONTENT_TYPE", "metrics_endpoint"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _loopback(peer: str) -> bool:
    try:
        ip = ipaddress.ip_address(peer)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


@get("/metrics", include_in_schema=False)
async def metrics_endpoint(request: Request, state: State) -> Response[str]:
    svc: Services = state.services
    token = svc.settings.metrics_token
    if token:
        if not check_token(bearer_token(request.scope), (token.encode("utf-8", "surrogateescape"),)):
            raise Unauthorized()
    elif not _loopback(client_ip(request.scope)):
        raise NotFound()
    redis_up = await svc.limiter.redis_state() == "ok"
    return Response(metrics.scrape(redis_up), media_type=CONTENT_TYPE)
