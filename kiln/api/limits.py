"""The request body size limit, as ASGI middleware (413 past it).

Bytes are counted as they arrive, so a chunked body (no Content-Length) is held
to the limit as well as one that declares its length; a declared length over
the limit is refused before any of the body is read. ``POST /upload`` has its
own, larger limit (``KILN_MAX_UPLOAD_BYTES`` plus the multipart framing), and so
do the routes ``limits_by_pattern`` names (a volume's file upload); every
other route has ``KILN_MAX_REQUEST_BYTES``.

When the count passes the limit mid-body, reading raises ``BodyTooLarge``, an
``HTTPException``: FastAPI lets those through its body parsing and Starlette
answers them (``{"detail": ...}``, 413); should anything else see it first, this
middleware answers it itself if no answer has started. The rest of the body is
not read by the app (uvicorn discards it), so nothing over the limit is held.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Multipart boundaries, part headers and the small form fields of POST /upload.
MULTIPART_OVERHEAD_BYTES = 64 * 1024


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than this server accepts ({limit} bytes)")


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # uvicorn refuses a malformed one before the app sees it
    return None


class BodySizeLimit:
    """``limit`` bytes per request body; ``limits_by_path`` overrides it for exact
    paths, ``limits_by_pattern`` for paths a regular expression matches whole."""

    def __init__(
        self,
        app: ASGIApp,
        limit: int,
        limits_by_path: Mapping[str, int] | None = None,
        limits_by_pattern: Sequence[tuple[re.Pattern[str], int]] = (),
    ) -> None:
        self.app = app
        self.limit = limit
        self.limits_by_path = dict(limits_by_path or {})
        self.limits_by_pattern = list(limits_by_pattern)

    def limit_for(self, path: str) -> int:
        if path in self.limits_by_path:
            return self.limits_by_path[path]
        return next((limit for pattern, limit in self.limits_by_pattern if pattern.fullmatch(path)), self.limit)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        declared = _declared_length(scope)
        if declared is not None and declared > limit:
            await _refuse(scope, receive, send, BodyTooLarge(limit))
            return
        received = 0
        answer_started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def watching_send(message: Message) -> None:
            nonlocal answer_started
            if message["type"] == "http.response.start":
                answer_started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, watching_send)
        except BodyTooLarge as error:
            if answer_started:
                raise
            await _refuse(scope, receive, send, error)


async def _refuse(scope: Scope, receive: Receive, send: Send, error: BodyTooLarge) -> None:
    # The connection stays open: uvicorn reads and drops the rest of the body, so
    # a client still sending it gets this answer instead of a reset.
    response = JSONResponse({"detail": error.detail}, 413)
    await response(scope, receive, send)
