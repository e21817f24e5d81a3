"""Named refusals for the instavm SDK's routes of features Kiln does not have.

The SDK calls routes of features this server lacks (computer use,
tapes, ...). A bare ``{"detail": "Not Found"}`` would read as a
wrong URL or a missing resource (the SDK's ``close_browser_session`` even takes
a 404 for success), so these paths answer 403 with a ``detail`` naming the
feature. 403, of the 4xx codes, because the SDK raises ``ForbiddenError(detail)``
for it: the one 4xx whose detail reaches the user in the exception's message.

*How:* the table is consulted only by the router's fallback, the handler
Starlette calls when no route matches the path. So every route that exists
keeps working, and a route a feature adds later wins over its row here without
anyone touching this file (delete the row then, to keep the table honest).
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import FastAPI
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocketClose

from kiln.services.vm_policy import COMPUTER_USE

STATUS = 403
# WebSocket refusals (computer use's VNC) close before accepting, with this code.
WEBSOCKET_CLOSE = 4403


@dataclass(frozen=True)
class Unbuilt:
    """Paths starting with ``prefix`` (``*`` matches one segment) belong to ``feature``."""

    prefix: str
    feature: str

    def matches(self, path: str) -> bool:
        wanted = self.prefix.strip("/").split("/")
        segments = path.strip("/").split("/")
        if len(segments) < len(wanted):
            return False
        return all(want in ("*", got) for want, got in zip(wanted, segments, strict=False))


# Features Kiln does not have (SDK-SURFACE.md sections 1a, 1d, 1e, 1i, 1l).
UNBUILT: tuple[Unbuilt, ...] = (
    Unbuilt("/v1/computeruse", COMPUTER_USE),
    Unbuilt("/v1/recordings", "desktop recordings"),
    Unbuilt("/v1/templates", "devbox templates"),
    Unbuilt("/v1/tapes", "time-travel tapes"),
    Unbuilt("/v1/sessions/*/tape", "time-travel tapes"),
    Unbuilt("/v1/credits", "credits and billing"),
    Unbuilt("/api/cli-auth", "browser login (set an API key instead: instavm auth set-key)"),
)


def feature_of(path: str) -> str | None:
    return next((row.feature for row in UNBUILT if row.matches(path)), None)


def refusal_detail(feature: str) -> str:
    return f"{feature}: not available on this server (Kiln does not implement this feature)"


def install_refusals(app: FastAPI) -> None:
    """Put the table in front of the router's not-found fallback."""
    fallback: ASGIApp = app.router.default

    async def refuse_or_fall_back(scope: Scope, receive: Receive, send: Send) -> None:
        feature = feature_of(scope.get("path", "")) if scope["type"] in ("http", "websocket") else None
        if feature is None:
            await fallback(scope, receive, send)
        elif scope["type"] == "websocket":
            await WebSocketClose(code=WEBSOCKET_CLOSE, reason=refusal_detail(feature)[:120])(scope, receive, send)
        else:
            await JSONResponse({"detail": refusal_detail(feature)}, status_code=STATUS)(scope, receive, send)

    app.router.default = refuse_or_fall_back
