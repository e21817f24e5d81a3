"""A VM's files (upload, download) and its terminal in the browser.

The terminal is the API's PTY: the page asks for one (a POST with the CSRF
header), then opens a WebSocket that authenticates with the session cookie,
never with a key in its URL. Browsers send cookies with a WebSocket to any
site, so the handshake's Origin must be this dashboard's own.
"""

from __future__ import annotations

import posixpath
from datetime import UTC, datetime
from urllib.parse import quote

from fastapi import APIRouter, Request, Response, WebSocket
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.datastructures import UploadFile
from starlette.requests import HTTPConnection

from kiln.api.dashboard import forms
from kiln.api.dashboard.session import COOKIE_NAME
from kiln.api.dashboard.web import Actor, DashboardRoute, PageError, Viewer, page, redirect
from kiln.api.deps import Services
from kiln.api.routers.pty import CLOSE_CODES, MAX_CLOSE_REASON, bridge
from kiln.schemas.pty import PtyCreateRequest
from kiln.services.errors import ServiceError, Unauthenticated
from kiln.services.guest import vm_target

router = APIRouter(prefix="/ui/vms/{vm_id}", route_class=DashboardRoute, include_in_schema=False)


@router.post("/files")
async def upload(request: Request, vm_id: str, who: Actor) -> Response:
    form = await request.form()
    file = form.get("file")
    if not isinstance(file, UploadFile) or not file.filename:
        raise PageError("choose a file to upload", 422)
    path = forms.text(form, "path") or file.filename
    if path.endswith("/"):
        path += posixpath.basename(file.filename)
    vm = await who.services.vms.get(who.user.id, vm_id)
    await who.services.files.upload(who.user.id, vm.session_id, path, file, False)
    return redirect(f"/ui/vms/{vm_id}?uploaded={quote(path)}")


@router.get("/files")
async def download(vm_id: str, path: str, who: Viewer) -> Response:
    if not path.strip():
        raise PageError("name the file to download", 422)
    vm = await who.services.vms.get(who.user.id, vm_id)
    file = await who.services.files.download(who.user.id, vm.session_id, path)
    name = posixpath.basename(path.rstrip("/")) or "download"
    return StreamingResponse(
        file.chunks(),
        media_type="application/octet-stream",
        # No Content-Length: the size is known only once the file is read (a cut answer is then visible).
        headers={"Content-Disposition": f"attachment; filename*=UTF-8''{quote(name)}"},
    )


@router.get("/dir")
async def list_dir(request: Request, vm_id: str, path: str, who: Viewer) -> Response:
    """One directory's listing (the VM page's file browser swaps it in)."""
    if not path.strip():
        raise PageError("name the directory to list", 422)
    vm = await who.services.vms.get(who.user.id, vm_id)
    listing = await who.services.files.list_dir(who.user.id, vm.session_id, path)
    entries = [
        {
            **entry,
            "name": posixpath.basename(entry["path"]),
            "modified": datetime.fromtimestamp(entry["mtime"], UTC).isoformat(timespec="seconds"),
        }
        for entry in listing.entries
    ]
    parent = (posixpath.dirname(listing.path.rstrip("/")) or "/") if listing.path != "/" else None
    context = {"vm_id": vm_id, "listing": listing, "entries": entries, "parent": parent}
    return page(request, "dir.html", context)


@router.post("/terminals")
async def open_terminal(request: Request, vm_id: str, who: Actor) -> Response:
    try:
        size = await request.json()
    except ValueError:
        raise PageError("send the terminal's size as JSON: {\"cols\": N, \"rows\": N}", 422) from None
    if not isinstance(size, dict):
        raise PageError("send the terminal's size as a JSON object", 422)
    # Only the size: the command and environment stay the image's defaults.
    body = PtyCreateRequest.model_validate({"cols": size.get("cols", 100), "rows": size.get("rows", 24)})
    target = await vm_target(who.services.vms, who.user.id, vm_id)
    record = await who.services.pty.open(target, body)
    return JSONResponse({"pty_id": record.pty_id})


def same_origin(connection: HTTPConnection) -> bool:
    origin = connection.headers.get("origin")
    host = connection.headers.get("host")
    return origin is not None and host is not None and origin in (f"http://{host}", f"https://{host}")


@router.websocket("/terminals/{pty_id}/ws")
async def terminal_socket(websocket: WebSocket, vm_id: str, pty_id: str) -> None:
    services: Services = websocket.app.state.services
    # Accepted first, so a refusal can say why in its close frame.
    await websocket.accept()
    try:
        session = websocket.app.state.dashboard_sessions.get(websocket.cookies.get(COOKIE_NAME))
        if session is None or not same_origin(websocket):
            raise Unauthenticated("sign in to the dashboard first")
        target = await vm_target(services.vms, session.user_id, vm_id)
        attachment = await services.pty.attach(target, pty_id)
    except ServiceError as error:
        code = next((c for kind, c in CLOSE_CODES.items() if isinstance(error, kind)), 4400)
        await websocket.close(code=code, reason=str(error)[:MAX_CLOSE_REASON])
        return
    await bridge(websocket, attachment)
