"""Pseudo-terminal routes (the instavm SDK's ``PtyManager``).

Every route exists twice: addressed by code-execution session
(``/v1/sessions/{session_id}/pty/...``) and by VM (``/v1/vms/{vm_id}/pty/...``).

``.../pty/{pty_id}/connect`` is a WebSocket carrying the terminal's bytes both
ways, in the instavm SDK's protocol:

- server to client: output as binary frames (first whatever the terminal printed
  before, up to the agent's scrollback); when the terminal's process ends, the
  text frame ``{"type": "exit", "exit_code": N}``, then close 1000;
- client to server: binary frames are input; a text frame holding a JSON object
  with a ``type`` is a control frame, never typed: ``{"type": "resize", "cols",
  "rows"}`` resizes the terminal, an unknown type or a bad size is answered with
  ``{"type": "error", "detail"}``; any other text frame is input.

Browsers cannot set headers on a WebSocket, so it also takes the key as
``?api_key=``. Right after accepting, a refusal closes with 4401 (not
authenticated), 4404 (no such session, VM or terminal), 4409 (VM not running)
or 4502 (guest unreachable: a code the SDK's CLI retries), and the reason. A
guest lost while connected closes with 1011.
"""

# No ``from __future__ import annotations``: the route factory below annotates
# parameters with its argument ``guest``, which FastAPI must see as an object.
import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import pydantic
from fastapi import APIRouter, Query, WebSocket, WebSocketDisconnect

from kiln.api.deps import Ptys, Services, SessionGuest, VmGuest, user_from_credentials
from kiln.schemas.errors import ErrorMessage, error_responses
from kiln.schemas.pty import (
    MAX_TERMINAL_SIZE,
    PtyCreateRequest,
    PtyKillResponse,
    PtyRecord,
    PtyResizeRequest,
)
from kiln.services.errors import (
    Conflict,
    GuestUnavailable,
    NotFound,
    ServiceError,
    Unauthenticated,
)
from kiln.services.guest import GuestTarget, session_target, vm_target
from kiln.services.pty import PtyAttachment
from kiln.store.models import User

router = APIRouter(tags=["pty"], responses={401: {"model": ErrorMessage}})

GUEST_ERRORS = error_responses(404, 409, 503)
CLOSE_CODES: dict[type[ServiceError], int] = {
    Unauthenticated: 4401,
    NotFound: 4404,
    Conflict: 4409,
    # The SDK's CLI retries 4500/4502/4504 (its "vm connection failed"), not 4503.
    GuestUnavailable: 4502,
}
# A WebSocket close reason is at most 123 bytes.
MAX_CLOSE_REASON = 120


def _add_terminal_routes(prefix: str, guest: Any, scope: str) -> None:
    """The REST routes of terminals under ``prefix``; ``guest`` resolves the VM."""

    @router.post(f"{prefix}/pty/sessions", name=f"create_pty_{scope}", responses=GUEST_ERRORS)
    async def create_pty(body: PtyCreateRequest, target: guest, ptys: Ptys) -> PtyRecord:
        return await ptys.open(target, body)

    @router.get(f"{prefix}/pty/sessions", name=f"list_ptys_{scope}", responses=GUEST_ERRORS)
    async def list_ptys(target: guest, ptys: Ptys) -> list[PtyRecord]:
        return await ptys.list(target)

    @router.get(
        f"{prefix}/pty/sessions/{{pty_id}}", name=f"get_pty_{scope}", responses=GUEST_ERRORS
    )
    async def get_pty(pty_id: str, target: guest, ptys: Ptys) -> PtyRecord:
        return await ptys.get(target, pty_id)

    @router.post(
        f"{prefix}/pty/sessions/{{pty_id}}/resize",
        name=f"resize_pty_{scope}",
        responses=GUEST_ERRORS,
    )
    async def resize_pty(
        pty_id: str, body: PtyResizeRequest, target: guest, ptys: Ptys
    ) -> PtyRecord:
        return await ptys.resize(target, pty_id, body.cols, body.rows)

    @router.delete(
        f"{prefix}/pty/sessions/{{pty_id}}", name=f"kill_pty_{scope}", responses=GUEST_ERRORS
    )
    async def kill_pty(pty_id: str, target: guest, ptys: Ptys) -> PtyKillResponse:
        record = await ptys.kill(target, pty_id)
        return PtyKillResponse(success=True, pty_id=record.pty_id, exit_code=record.exit_code)


_add_terminal_routes("/v1/sessions/{session_id}", SessionGuest, "in_session")
_add_terminal_routes("/v1/vms/{vm_id}", VmGuest, "in_vm")


ApiKeyQuery = Annotated[str | None, Query(description="API key (for clients without headers)")]


@router.websocket("/v1/sessions/{session_id}/pty/{pty_id}/connect")
async def connect_pty_in_session(
    websocket: WebSocket, session_id: str, pty_id: str, api_key: ApiKeyQuery = None
) -> None:
    services: Services = websocket.app.state.services
    await _serve_terminal(
        websocket,
        pty_id,
        api_key,
        lambda user: session_target(services.vms, user.id, session_id),
    )


@router.websocket("/v1/vms/{vm_id}/pty/{pty_id}/connect")
async def connect_pty_in_vm(
    websocket: WebSocket, vm_id: str, pty_id: str, api_key: ApiKeyQuery = None
) -> None:
    services: Services = websocket.app.state.services
    await _serve_terminal(
        websocket, pty_id, api_key, lambda user: vm_target(services.vms, user.id, vm_id)
    )


async def _serve_terminal(
    websocket: WebSocket,
    pty_id: str,
    api_key: str | None,
    resolve: Callable[[User], Awaitable[GuestTarget]],
) -> None:
    services: Services = websocket.app.state.services
    # Accepted first, so a refusal can say why in its close frame.
    await websocket.accept()
    try:
        bearer = websocket.headers.get("authorization", "").removeprefix("Bearer ").strip()
        user = await user_from_credentials(
            services.auth, websocket.headers.get("x-api-key"), bearer, api_key
        )
        attachment = await services.pty.attach(await resolve(user), pty_id)
    except ServiceError as error:
        code = next((c for kind, c in CLOSE_CODES.items() if isinstance(error, kind)), 4400)
        await websocket.close(code=code, reason=str(error)[:MAX_CLOSE_REASON])
        return
    await bridge(websocket, attachment)


async def bridge(websocket: WebSocket, attachment: PtyAttachment) -> None:
    """Copy bytes both ways until the terminal ends or the client goes."""

    async def terminal_to_client() -> None:
        async for data in attachment.output():
            await websocket.send_bytes(data)

    async def client_to_terminal() -> None:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            control = _control_frame(text) if text is not None else None
            if control is not None:
                await _obey(websocket, attachment, control)
                continue
            data = message.get("bytes") or (text or "").encode()
            if data:
                await attachment.write(data)

    tasks = [
        asyncio.create_task(terminal_to_client(), name=f"pty-out:{attachment.pty_id}"),
        asyncio.create_task(client_to_terminal(), name=f"pty-in:{attachment.pty_id}"),
    ]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await attachment.close()
    failure = next(
        (r for r in results if isinstance(r, ServiceError)), None
    )
    with contextlib.suppress(WebSocketDisconnect, RuntimeError):
        # RuntimeError: the client already closed; there is nobody to tell.
        if failure is not None:
            await websocket.close(code=1011, reason=str(failure)[:MAX_CLOSE_REASON])
            return
        if attachment.exit_code is not None:
            # The SDK's CLI exits with this code; its agents integration reports it.
            await websocket.send_text(json.dumps({"type": "exit", "exit_code": attachment.exit_code}))
            await websocket.close(code=1000, reason=f"exit code {attachment.exit_code}")
        else:
            await websocket.close(code=1000)


def _control_frame(text: str) -> dict[str, Any] | None:
    """The control message a text frame holds, or None when it is input."""
    if not text.lstrip().startswith("{"):
        return None
    try:
        message = json.loads(text)
    except ValueError:
        return None
    return message if isinstance(message, dict) and "type" in message else None


async def _obey(websocket: WebSocket, attachment: PtyAttachment, control: dict[str, Any]) -> None:
    if control["type"] == "resize":
        try:
            size = PtyResizeRequest.model_validate({"cols": control.get("cols"), "rows": control.get("rows")})
        except pydantic.ValidationError:
            detail = f"resize needs integer cols and rows from 1 to {MAX_TERMINAL_SIZE}"
        else:
            await attachment.resize(size.cols, size.rows)
            return
    else:
        detail = f"unknown control frame type {control['type']!r} (known: resize)"
    await websocket.send_text(json.dumps({"type": "error", "detail": detail}))
