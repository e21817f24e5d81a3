"""Wire models of code execution: ``/execute``, ``/execute_async``, executions, streams."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, Field

from kiln.schemas.bodies import RequestBody


class Language(StrEnum):
    PYTHON = "python"
    BASH = "bash"


class CommandRequest(RequestBody):
    """What to run; the session comes from the body or from the route."""

    command: str
    language: Language = Language.PYTHON
    timeout: float | None = Field(default=None, gt=0, description="Seconds; the run is killed after it (output kept).")


class ExecuteRequest(CommandRequest):
    session_id: str


class ExecuteResponse(BaseModel):
    stdout: str
    # The same text as ``stdout``, under the name the SDK's ``execute_streaming``
    # and its CLI read first.
    output: str
    stderr: str
    exit_code: int
    execution_time: float
    cpu_time: float
    timed_out: bool
    truncated: bool


class ExecuteAsyncResponse(BaseModel):
    task_id: str
    status: str


class ExecutionTaskRecord(BaseModel):
    task_id: str
    session_id: str
    status: str
    is_complete: bool
    # Plain text, despite the names (InstaVM's; the SDK reads them as text).
    serialized_stdout: str
    serialized_stderr: str
    exit_code: int | None
    cpu_time: float | None
    execution_time: float | None
    created_at: datetime
    completed_at: datetime | None
    # Why a task could not run to its end (its VM or the server went away).
    error: str | None
