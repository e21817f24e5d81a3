"""Code execution routes (API.md, "Sessions and execution").

``POST /execute`` answers when the run ends: stdout/stderr (at most 1 MiB each,
marked ``[kiln: output truncated after N bytes]`` when cut), exit code and
times; a run that reaches ``timeout`` is killed and answered with its output so
far and a note in stderr. ``POST /execute_async`` answers at once with a task
id; ``GET /v1/executions/{task_id}`` reports it.

``POST /v1/sessions/{session_id}/execute/stream`` (and the VM-addressed
``/v1/vms/{vm_id}/execute/stream``) answer with server-sent events as output
arrives. Every ``data`` is JSON::

    event: stdout            data: "<text>"      (a JSON string: any bytes survive)
    event: stderr            data: "<text>"
    event: exit              data: {"exit_code", "timed_out", "execution_time", "cpu_time"}
    event: error             data: {"detail"}    (the run broke off, e.g. the VM died)

A request that cannot start (unknown session, VM not running, bad input) is
answered with its 4xx before any event.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from kiln.api.deps import CurrentUser, Execution, SessionGuest, VmGuest, Vms
from kiln.schemas.errors import ErrorMessage, Responses, error_responses
from kiln.schemas.execution import (
    CommandRequest,
    ExecuteAsyncResponse,
    ExecuteRequest,
    ExecuteResponse,
    ExecutionTaskRecord,
)
from kiln.services.errors import ServiceError
from kiln.services.execution import ExecutionService, OutputChunk, TaskStatus
from kiln.services.guest import GuestTarget, session_target
from kiln.store.models import ExecutionTask

router = APIRouter(tags=["execution"], responses={401: {"model": ErrorMessage}})

GUEST_ERRORS = error_responses(404, 409, 503)
SSE_RESPONSE: Responses = {200: {"content": {"text/event-stream": {}}, "description": "server-sent events"}}


@router.post("/execute", responses=GUEST_ERRORS)
async def execute(
    body: ExecuteRequest, user: CurrentUser, execution: Execution, vms: Vms
) -> ExecuteResponse:
    target = await session_target(vms, user.id, body.session_id)
    result = await execution.run(target, body.command, body.language, body.timeout)
    return ExecuteResponse(
        stdout=result.stdout,
        output=result.stdout,
        stderr=result.stderr,
        exit_code=result.exit_code,
        execution_time=result.execution_time,
        cpu_time=result.cpu_time,
        timed_out=result.timed_out,
        truncated=result.truncated,
    )


@router.post("/execute_async", responses=GUEST_ERRORS)
async def execute_async(
    body: ExecuteRequest, user: CurrentUser, execution: Execution
) -> ExecuteAsyncResponse:
    task = await execution.start_task(
        user.id, body.session_id, body.command, body.language, body.timeout
    )
    return ExecuteAsyncResponse(task_id=task.id, status=task.status)


@router.get("/v1/executions/{task_id}", responses={404: {"model": ErrorMessage}})
async def get_execution(
    task_id: str, user: CurrentUser, execution: Execution
) -> ExecutionTaskRecord:
    return _task_record(await execution.get_task(user.id, task_id))


@router.post(
    "/v1/sessions/{session_id}/execute/stream", responses={**GUEST_ERRORS, **SSE_RESPONSE}
)
async def execute_stream_in_session(
    body: CommandRequest, target: SessionGuest, execution: Execution
) -> StreamingResponse:
    return _event_stream(execution, target, body)


@router.post("/v1/vms/{vm_id}/execute/stream", responses={**GUEST_ERRORS, **SSE_RESPONSE})
async def execute_stream_in_vm(
    body: CommandRequest, target: VmGuest, execution: Execution
) -> StreamingResponse:
    return _event_stream(execution, target, body)


def _task_record(task: ExecutionTask) -> ExecutionTaskRecord:
    return ExecutionTaskRecord(
        task_id=task.id,
        session_id=task.session_id,
        status=task.status,
        is_complete=task.status != TaskStatus.RUNNING,
        serialized_stdout=task.stdout,
        serialized_stderr=task.stderr,
        exit_code=task.exit_code,
        cpu_time=task.cpu_time,
        execution_time=task.execution_time,
        created_at=task.created_at,
        completed_at=task.completed_at,
        error=task.error,
    )


def _sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def _event_stream(
    execution: ExecutionService, target: GuestTarget, body: CommandRequest
) -> StreamingResponse:
    # Called (not iterated) here, so a bad timeout is a 422 before the 200 starts.
    events = execution.stream(target, body.command, body.language, body.timeout)

    async def render() -> AsyncIterator[bytes]:
        # Incremental: a UTF-8 character split across two chunks is decoded whole.
        decoders = {
            name: codecs.getincrementaldecoder("utf-8")(errors="replace")
            for name in ("stdout", "stderr")
        }
        try:
            async for event in events:
                if isinstance(event, OutputChunk):
                    text = decoders[event.stream].decode(event.data)
                    if text:
                        yield _sse(event.stream, text)
                    continue
                for name, decoder in decoders.items():
                    if rest := decoder.decode(b"", final=True):
                        yield _sse(name, rest)
                yield _sse(
                    "exit",
                    {
                        "exit_code": event.exit_code,
                        "timed_out": event.timed_out,
                        "execution_time": event.execution_time,
                        "cpu_time": event.cpu_time,
                    },
                )
        except ServiceError as error:
            yield _sse("error", {"detail": str(error)})

    return StreamingResponse(
        render(),
        media_type="text/event-stream",
        # No caching, and no buffering in a reverse proxy: events must flow as they come.
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
