"""A request id for every HTTP request: in the ``X-Request-ID`` answer header and
on every log line written while the request is served.

A client's own ``X-Request-ID`` is kept when it is a plain token (at most 64
letters, digits, ``.``, ``_``, ``-``), so a caller can follow its request
through the log; anything else is replaced by a new random id, never echoed
(a header is not a place for a client to write into the server's log).
"""

from __future__ import annotations

import re
import secrets
from contextvars import ContextVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = "X-Request-ID"
ACCEPTED = re.compile(r"^[A-Za-z0-9._\-]{1,64}$")

current_request_id: ContextVar[str | None] = ContextVar("kiln_request_id", default=None)


def new_request_id() -> str:
    return secrets.token_hex(8)


class RequestIds:
    """ASGI middleware: picks the id, sets it for the request's logs, answers it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        given = next((value.decode("latin-1") for name, value in scope["headers"] if name == b"x-request-id"), "")
        request_id = given if ACCEPTED.match(given) else new_request_id()
        token = current_request_id.set(request_id)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            current_request_id.reset(token)
