"""Session routes (API.md, "Sessions and execution"): InstaVM's sandbox handle.

``POST /v1/sessions/session`` takes its credential from the headers or, as the
instavm SDK sends it, from ``api_key`` in the body. It answers once the VM runs
(503 with the reason if it fails to start). ``GET /v1/sessions/status/{sid}``
says ``vm_status: active`` and ``vm_alive: true`` while the VM runs. ``GET /v1/sessions/app-url/{sid}``
answers the URL of the session VM's share of a port (made private if it had none).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query

from kiln.api.deps import Auth, CurrentUser, Ledger, Sessions, Shares, bearer_token, user_from_credentials
from kiln.api.routers.vms import MetadataFilter
from kiln.schemas.errors import ErrorMessage, error_responses
from kiln.schemas.sessions import (
    KillRequest,
    KillResponse,
    SessionCreateRequest,
    SessionCreateResponse,
    SessionRecord,
    SessionStatus,
    SessionUsage,
)
from kiln.schemas.shares import AppUrl
from kiln.services.sessions import (
    DEFAULT_SANDBOX_LIST,
    MAX_SANDBOX_LIST,
    public_status,
    vm_alive,
)

router = APIRouter(tags=["sessions"], responses={401: {"model": ErrorMessage}})

NOT_FOUND = error_responses(404)


@router.post("/v1/sessions/session", responses={503: {"model": ErrorMessage}})
async def create_session(
    body: SessionCreateRequest,
    auth: Auth,
    sessions: Sessions,
    token: Annotated[str | None, Depends(bearer_token)],
    x_api_key: Annotated[str | None, Header(alias="X-API-Key")] = None,
) -> SessionCreateResponse:
    user = await user_from_credentials(auth, x_api_key, token, body.api_key)
    vm = await sessions.create(user.id, body)
    return SessionCreateResponse(session_id=vm.session_id, vm_id=vm.id, status=vm.status)


@router.get("/v1/sessions/session/{session_id}", responses=NOT_FOUND)
async def get_session(session_id: str, user: CurrentUser, sessions: Sessions) -> SessionRecord:
    return SessionRecord.from_row(await sessions.get(user.id, session_id))


@router.get("/v1/sessions/status/{session_id}", responses=NOT_FOUND)
async def get_session_status(
    session_id: str, user: CurrentUser, sessions: Sessions
) -> SessionStatus:
    vm = await sessions.get(user.id, session_id)
    return SessionStatus(
        session_id=vm.session_id,
        vm_id=vm.id,
        vm_status=public_status(vm),
        vm_alive=vm_alive(vm),
    )


@router.get("/v1/sessions/sandboxes")
async def list_sandboxes(
    user: CurrentUser,
    sessions: Sessions,
    metadata: MetadataFilter,
    limit: Annotated[int, Query(ge=1, le=MAX_SANDBOX_LIST)] = DEFAULT_SANDBOX_LIST,
) -> list[SessionRecord]:
    """Session VMs (terminated ones too), newest first."""
    return [SessionRecord.from_row(vm) for vm in await sessions.list(user.id, metadata, limit)]


@router.get("/v1/sessions/usage/{session_id}", responses=NOT_FOUND)
async def get_session_usage(
    session_id: str, user: CurrentUser, sessions: Sessions, ledger: Ledger
) -> SessionUsage:
    usage = await sessions.usage(user.id, session_id)
    used = await ledger.of_session(user.id, session_id)
    vm = usage.vm
    return SessionUsage(
        session_id=vm.session_id,
        vm_id=vm.id,
        status=vm.status,
        cpu_seconds=usage.process.cpu_seconds if usage.process else None,
        memory_mb=vm.memory_mb,
        rss_mb=usage.process.rss_mb if usage.process else None,
        vcpu_count=vm.vcpu_count,
        uptime_seconds=usage.uptime_seconds,
        vcpu_seconds=round(used.vcpu_seconds, 3),
        memory_gib_seconds=round(used.memory_gib_seconds, 3),
        disk_gib_seconds=round(used.disk_gib_seconds, 3),
        disk_gib_hours=round(used.disk_gib_hours, 6),
    )


@router.get("/v1/sessions/app-url/{session_id}", responses=NOT_FOUND)
async def get_session_app_url(
    session_id: str,
    user: CurrentUser,
    shares: Shares,
    port: Annotated[int, Query(ge=1, le=65535)] = 80,
) -> AppUrl:
    """The URL of the session VM's share of ``port`` (a private one is made if there is none)."""
    share = await shares.app_url(user.id, session_id, port)
    return AppUrl(url=share.url, share_id=share.share_id, port=share.port, is_public=share.is_public)


@router.post("/kill", responses=NOT_FOUND)
async def kill_session(body: KillRequest, user: CurrentUser, sessions: Sessions) -> KillResponse:
    vm = await sessions.kill(user.id, body.session_id)
    return KillResponse(success=True, vm_id=vm.id)
