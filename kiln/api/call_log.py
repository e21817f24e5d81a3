"""``ApiCalls``: reports each mutating request to the app's ``CallLog`` once answered.

Who made the call comes from the authentication dependency, which writes the
user's id into this request's ``CallInfo`` (``note_user``); a request that
never authenticated is ``anonymous``.
"""

from __future__ import annotations

import time
from contextvars import ContextVar
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kiln.services.events.record import NewEvent

MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@dataclass
class CallInfo:
    user_id: int | None = None


current_call: ContextVar[CallInfo | None] = ContextVar("kiln_call", default=None)


def note_user(user_id: int) -> None:
    info = current_call.get()
    if info is not None:
        info.user_id = user_id


def call_status(code: int) -> str:
    if code < 400:
        return "success"
    return "denied" if code in (401, 403, 429) else "failure"


class ApiCalls:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in MUTATING:
            await self.app(scope, receive, send)
            return
        info = CallInfo()
        token = current_call.set(info)
        started = time.monotonic()
        status = [500]

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            current_call.reset(token)
            self._report(scope, info, status[0], time.monotonic() - started)

    @staticmethod
    def _report(scope: Scope, info: CallInfo, code: int, seconds: float) -> None:
        services = getattr(getattr(scope.get("app"), "state", None), "services", None)
        calls = getattr(services, "calls", None)
        if calls is None:
            return  # not started yet, or stopping
        route = scope.get("route")
        # The template (/v1/vms/{vm_id}), never the query or the body; unknown paths as "-".
        template = getattr(route, "path", None) or "-"
        payload = {
            "method": scope["method"],
            "route": template,
            "status_code": code,
            "duration_ms": round(seconds * 1000, 1),
        }
        actor = {"actor_type": "user", "actor_id": str(info.user_id)} if info.user_id else {"actor_type": "anonymous"}
        calls.note(NewEvent("api.call", info.user_id, status=call_status(code), payload=payload, **actor))
