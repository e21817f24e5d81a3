"""Wire models of the pseudo-terminal routes (the instavm SDK's ``PtyManager``)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from kiln.schemas.bodies import RequestBody

MAX_TERMINAL_SIZE = 1000


class PtyCreateRequest(RequestBody):
    cols: int = Field(default=80, ge=1, le=MAX_TERMINAL_SIZE)
    rows: int = Field(default=24, ge=1, le=MAX_TERMINAL_SIZE)
    # A command line, run by ``/bin/bash -lc`` (pipes, &&, ... work).
    command: str | None = None
    # A shell program, exec'd directly; ignored when ``command`` is given.
    shell: str | None = None
    env: dict[str, str] | None = None
    # The terminal's id, if the client wants to choose it.
    id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._-]{1,64}$")


class PtyResizeRequest(RequestBody):
    cols: int = Field(ge=1, le=MAX_TERMINAL_SIZE)
    rows: int = Field(ge=1, le=MAX_TERMINAL_SIZE)


class PtyRecord(BaseModel):
    # InstaVM calls a terminal a "PTY session": the SDK reads its id from
    # ``session_id``. It is the terminal's id, the same as ``pty_id``.
    session_id: str
    pty_id: str
    vm_id: str
    pid: int
    argv: list[str]
    cols: int
    rows: int
    alive: bool
    exit_code: int | None
    created_at: datetime


class PtyKillResponse(BaseModel):
    success: bool
    pty_id: str
    exit_code: int | None
