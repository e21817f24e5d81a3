"""File transfer routes (API.md, "Sessions and execution").

``POST /upload`` (multipart: ``file``, ``remote_path``, ``session_id``,
``recursive``) writes the file at ``remote_path`` in the session's VM; with
``recursive=true`` the file is a tar archive unpacked under ``remote_path``.
``POST /download`` (form: ``filename``, ``session_id``) answers the file
base64-encoded, as ``{"filename", "content", "size"}`` (what the instavm SDK
reads), streamed: the JSON is sent piece by piece while the guest file is read,
``content`` base64-encoded chunk by chunk on 3-byte boundaries (so the pieces
join into one valid base64 text) and ``size`` last. A failure after the answer
started cuts it (the client sees an incomplete body, never a short file).
Relative paths are relative to the image's working directory. Errors: a missing
file or parent directory 404, a directory where a file is expected 409, a file
or upload over its size limit 413 (KILN_MAX_DOWNLOAD_BYTES,
KILN_MAX_UPLOAD_BYTES), a malformed body 400/422.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Annotated, Any, Protocol

from fastapi import APIRouter, File, Form, Request, Response, UploadFile
from fastapi.responses import StreamingResponse
from fastapi.routing import APIRoute
from starlette.types import Message

from kiln.api.deps import CurrentUser, Files
from kiln.schemas.errors import ErrorMessage, error_responses
from kiln.schemas.files import DownloadResponse, UploadResponse


class BodyDrainingRoute(APIRoute):
    """Reads the rest of a request body before an error answer goes out.

    A multipart parser that fails half-way leaves the rest of the body unread;
    the server would then close the connection with data still in the socket,
    which the client sees as a reset instead of the 400 it was sent.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        answer = super().get_route_handler()

        async def answer_after_the_body(request: Request) -> Response:
            body_ended = False

            async def receive() -> Message:
                nonlocal body_ended
                message = await request.receive()
                body_ended = message["type"] != "http.request" or not message.get("more_body")
                return message

            try:
                return await answer(Request(request.scope, receive, request._send))
            except Exception:
                while not body_ended:
                    await receive()
                raise

        return answer_after_the_body


router = APIRouter(
    tags=["files"], responses={401: {"model": ErrorMessage}}, route_class=BodyDrainingRoute
)

FILE_ERRORS = error_responses(400, 404, 409, 413, 503)


@router.post("/upload", responses=FILE_ERRORS)
async def upload(
    file: Annotated[UploadFile, File()],
    remote_path: Annotated[str, Form()],
    session_id: Annotated[str, Form()],
    user: CurrentUser,
    files: Files,
    recursive: Annotated[bool, Form()] = False,
) -> UploadResponse:
    uploaded = await files.upload(user.id, session_id, remote_path, file, recursive)
    return UploadResponse(success=True, path=uploaded.path, size=uploaded.size)


@router.post(
    "/download",
    responses={**FILE_ERRORS, 200: {"model": DownloadResponse, "content": {"application/json": {}}}},
    response_class=StreamingResponse,
)
async def download(
    filename: Annotated[str, Form()],
    session_id: Annotated[str, Form()],
    user: CurrentUser,
    files: Files,
) -> StreamingResponse:
    downloaded = await files.download(user.id, session_id, filename)
    return StreamingResponse(download_json({"filename": filename}, downloaded), media_type="application/json")


class Streamed(Protocol):
    size: int  # the whole size, once ``chunks`` is done

    def chunks(self) -> AsyncIterator[bytes]: ...


async def download_json(head: dict[str, str], download: Streamed) -> AsyncIterator[bytes]:
    """``{**head, "content": "<base64>", "size": N}``, one piece at a time (base64
    of 3-byte-aligned pieces joins into one valid text). ``head``: not empty."""
    yield json.dumps(head)[:-1].encode() + b', "content": "'
    pending = b""  # bytes not yet encoded: fewer than 3
    async for chunk in download.chunks():
        data = pending + chunk
        aligned = len(data) - len(data) % 3
        pending = data[aligned:]
        if aligned:
            yield base64.b64encode(data[:aligned])
    yield base64.b64encode(pending) + b'", "size": ' + str(download.size).encode() + b"}"
