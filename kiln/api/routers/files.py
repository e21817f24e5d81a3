"""File transfer routes (API.md, "Sessions and execution").

``POST /upload`` (multipart: ``file``, ``remote_path``, ``session_id``,
``recursive``) writes the file at ``remote_path`` in the session's VM; with
``recursive=true`` the file is a tar archive unpacked under ``remote_path``.
``POST /download`` (form: ``filename``, ``session_id``) answers the file
base64-encoded. Relative paths are relative to the image's working directory.
Errors: a missing file or parent directory 404, a directory where a file is
expected 409, a file over the size limit 413, a malformed body 400/422.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Request, Response, UploadFile
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


@router.post("/download", responses=FILE_ERRORS)
async def download(
    filename: Annotated[str, Form()],
    session_id: Annotated[str, Form()],
    user: CurrentUser,
    files: Files,
) -> DownloadResponse:
    downloaded = await files.download(user.id, session_id, filename)
    return DownloadResponse(
        filename=filename,
        content=base64.b64encode(downloaded.data).decode("ascii"),
        size=len(downloaded.data),
    )
