"""``GET /metrics``: Prometheus's text format, for the operator only.

Accepted: ``Authorization: Bearer <KILN_METRICS_TOKEN>`` (what a Prometheus
scrape config sends; compared in constant time), or the admin's API key or
token. Anyone else: 401 without a credential, 403 with another user's.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import APIRouter, Depends, Header, HTTPException, Request, Response

from kiln.api.deps import Auth, bearer_token, get_services, user_from_credentials
from kiln.api.metrics import Metrics
from kiln.schemas.errors import ErrorMessage
from kiln.services.events.audit import is_admin

router = APIRouter(tags=["metrics"])

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def get_metrics(request: Request) -> Metrics:
    return get_services(request).metrics


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}}, 401: {"model": ErrorMessage}, 403: {"model": ErrorMessage}},
)
async def metrics(
    auth: Auth,
    metrics: Annotated[Metrics, Depends(get_metrics)],
    token: Annotated[str | None, Depends(bearer_token)],
    x_api_key: Annotated[str | None, Header(alias="X-API-Key")] = None,
) -> Response:
    operator = bool(metrics.token) and any(
        candidate is not None and hmac.compare_digest(candidate.encode(), metrics.token.encode())
        for candidate in (token, x_api_key)
    )
    if not operator:
        user = await user_from_credentials(auth, x_api_key, token)
        if not is_admin(user):
            raise HTTPException(403, "the metrics are the operator's: send KILN_METRICS_TOKEN or the admin's key")
    body = metrics.telemetry.render(await metrics.stats.snapshot())
    return Response(body, media_type=CONTENT_TYPE)
