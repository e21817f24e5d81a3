"""Running code in a VM: ``/execute``, ``/execute_async`` and the SSE stream.

Python runs in the guest agent's persistent interpreter of the VM
(``python_exec``), so globals survive from one call to the next; bash runs as
``/bin/bash -c`` (``exec``). Both start in the image's working directory
(``/app`` in the default image).

Limits, and why:
- A run stops ``timeout`` seconds after it starts, minus a small reply margin:
  the instavm SDK uses the same number as its HTTP read timeout, so the answer
  (with the output so far and a note in stderr) must leave before that.
- ``/execute`` returns at most ``MAX_RETURNED_BYTES`` per stream and marks a cut
  with ``TRUNCATION_MARKER``. The agent stops forwarding output past
  ``AGENT_OUTPUT_LIMIT`` but keeps draining the command's pipes, so a command
  printing 10 MB neither blocks in the guest nor fills the server's memory.
- The SSE stream forwards up to ``STREAM_OUTPUT_LIMIT`` as it arrives.

Async tasks are rows of ``execution_tasks``: ``running`` until the run ends,
then ``complete`` (it ran; any exit code) or ``failed`` (it could not run to its
end: its VM went away, or the server stopped or crashed meanwhile). A server
that starts settles the ``running`` rows an earlier one left behind.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kiln.guest import protocol
from kiln.schemas.execution import Language
from kiln.services.errors import InvalidRequest, NotFound, ServiceError
from kiln.services.guest import GuestTarget, agent_errors, session_target
from kiln.services.staged_env import StagedEnv
from kiln.services.vms import VmService
from kiln.store.db import Database
from kiln.store.models import ExecutionTask
from kiln.store.repositories import ExecutionTaskRepository

log = logging.getLogger(__name__)

MAX_RETURNED_BYTES = 1024 * 1024
# Twice the per-stream cap (plus one byte, so reaching it always means a stream
# was cut): either stream can fill its share even if the other is quiet.
AGENT_OUTPUT_LIMIT = 2 * MAX_RETURNED_BYTES + 1
STREAM_OUTPUT_LIMIT = 10 * 1024 * 1024
TRUNCATION_MARKER = "\n[kiln: output truncated after {kept} bytes]"
TIMEOUT_NOTE = "\n[kiln: execution stopped at its time limit of {timeout:g} s; the output so far is above]\n"

DEFAULT_TIMEOUT_SECONDS = 300.0
MAX_TIMEOUT_SECONDS = 24 * 3600.0
# The run is stopped this much (at most a quarter of the timeout) before the
# timeout, so the answer reaches a client that waits exactly ``timeout``: under
# TCG, killing a python session and answering took about 0.3 s.
REPLY_MARGIN_SECONDS = 1.0

BASH = "/bin/bash"
# The guest interpreter that /execute's python runs in. A VM serves one session,
# so one interpreter per VM is the session's; naming it by a constant rather than
# the session id lets a VM made from a snapshot (which belongs to a new session)
# carry on with the snapshot's variables.
PYTHON_INTERPRETER = "main"


class TaskStatus:
    RUNNING = "running"
    COMPLETE = "complete"
    FAILED = "failed"


@dataclass(frozen=True)
class OutputChunk:
    stream: str  # "stdout" or "stderr"
    data: bytes


@dataclass(frozen=True)
class RunFinished:
    exit_code: int
    timed_out: bool
    truncated: bool  # the agent dropped output past its limit
    execution_time: float
    cpu_time: float


RunEvent = OutputChunk | RunFinished


@dataclass(frozen=True)
class ExecutionResult:
    stdout: str
    stderr: str
    exit_code: int
    execution_time: float
    cpu_time: float
    timed_out: bool
    truncated: bool


class CappedOutput:
    """One stream's output, kept up to a byte limit, then only counted."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.kept = bytearray()
        self.dropped = 0

    def add(self, data: bytes) -> None:
        room = self.limit - len(self.kept)
        self.kept += data[:room]
        self.dropped += max(len(data) - room, 0)

    def text(self, cut_elsewhere: bool) -> str:
        """The output as text; marked when this stream (or, per ``cut_elsewhere``,
        the agent's shared limit) lost some of it."""
        text = self.kept.decode("utf-8", errors="replace")
        if self.dropped or cut_elsewhere:
            text += TRUNCATION_MARKER.format(kept=len(self.kept))
        return text


def check_timeout(timeout: float | None) -> float:
    if timeout is None:
        return DEFAULT_TIMEOUT_SECONDS
    if timeout > MAX_TIMEOUT_SECONDS:
        raise InvalidRequest.single(("timeout",), f"must be at most {MAX_TIMEOUT_SECONDS:g} seconds")
    return timeout


def guest_time_limit(timeout: float) -> float:
    return timeout - min(REPLY_MARGIN_SECONDS, timeout / 4)


def unfinished_note(reason: str) -> str:
    """The stderr of a task that could not run to its end."""
    return f"[kiln: the task did not finish: {reason}]\n"


def _now() -> datetime:
    return datetime.now(UTC)


class ExecutionService:
    def __init__(self, vms: VmService, db: Database, staged: StagedEnv | None = None) -> None:
        self._vms = vms
        self._db = db
        self._staged = staged or StagedEnv()
        self._tasks: dict[str, asyncio.Task[None]] = {}

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Settle the tasks an earlier server was running when it stopped or crashed."""
        reason = "the server restarted while this task ran; its result is lost"
        async with self._db.transaction() as session:
            settled = await ExecutionTaskRepository(session).finish_all_in_status_any_owner(
                TaskStatus.RUNNING,
                status=TaskStatus.FAILED,
                stderr=unfinished_note(reason),
                error=reason,
                completed_at=_now(),
            )
        if settled:
            log.warning("%d execution task(s) were cut off by a server restart", settled)

    async def stop(self) -> None:
        """Cancel running tasks; each records that the server stopped under it."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- running ---------------------------------------------------------------------

    def stream(
        self, target: GuestTarget, command: str, language: Language, timeout: float | None
    ) -> AsyncIterator[RunEvent]:
        """Run ``command``, yielding output as the guest sends it (up to
        ``STREAM_OUTPUT_LIMIT``, then a note), then ``RunFinished``.

        The timeout is checked here, before anything runs."""
        time_limit = check_timeout(timeout)
        return self._stream_with_notes(target, command, language, time_limit)

    async def _stream_with_notes(
        self, target: GuestTarget, command: str, language: Language, timeout: float
    ) -> AsyncIterator[RunEvent]:
        async for event in self._run_in_guest(
            target, command, language, timeout, STREAM_OUTPUT_LIMIT
        ):
            if isinstance(event, RunFinished):
                if event.truncated:
                    note = TRUNCATION_MARKER.format(kept=STREAM_OUTPUT_LIMIT) + "\n"
                    yield OutputChunk(protocol.KIND_STDERR, note.encode())
                if event.timed_out:
                    yield OutputChunk(
                        protocol.KIND_STDERR, TIMEOUT_NOTE.format(timeout=timeout).encode()
                    )
            yield event

    async def _run_in_guest(
        self,
        target: GuestTarget,
        command: str,
        language: Language,
        timeout: float,
        output_limit: int,
    ) -> AsyncIterator[RunEvent]:
        args: dict[str, object]
        staged = self._staged.take(target.vm.id)
        if language == Language.PYTHON:
            op, args = "python_exec", {"session": PYTHON_INTERPRETER, "code": command}
        else:
            op, args = "exec", {"argv": [BASH, "-c", command], "env": staged}
        with agent_errors(target):
            if staged and language == Language.PYTHON:
                await self._stage_in_interpreter(target, staged)
            async for frame in target.agent.stream(
                op, timeout=guest_time_limit(timeout), output_limit=output_limit, **args
            ):
                kind = frame.get("kind")
                if kind in (protocol.KIND_STDOUT, protocol.KIND_STDERR):
                    yield OutputChunk(kind, base64.b64decode(frame.get("data", "")))
                elif kind == protocol.KIND_RESULT:
                    value: dict[str, Any] = frame.get("value") or {}
                    yield RunFinished(
                        exit_code=int(value.get("exit_code", -1)),
                        timed_out=bool(value.get("timed_out")),
                        truncated=bool(value.get("truncated")),
                        execution_time=float(value.get("duration", 0.0)),
                        cpu_time=float(value.get("cpu_time", 0.0)),
                    )

    async def _stage_in_interpreter(self, target: GuestTarget, env: dict[str, str]) -> None:
        """Staged values into the persistent interpreter's ``os.environ`` (its
        memory, and what it starts), in a cell of their own so the user's code
        keeps its line numbers."""
        code = f"__import__('os').environ.update({env!r})"
        async for _ in target.agent.stream(
            "python_exec", timeout=30, session=PYTHON_INTERPRETER, code=code
        ):
            pass

    async def run(
        self, target: GuestTarget, command: str, language: Language, timeout: float | None
    ) -> ExecutionResult:
        """Run ``command`` to its end and return its (capped) output."""
        outputs = {
            protocol.KIND_STDOUT: CappedOutput(MAX_RETURNED_BYTES),
            protocol.KIND_STDERR: CappedOutput(MAX_RETURNED_BYTES),
        }
        time_limit = check_timeout(timeout)
        finished: RunFinished | None = None
        started = time.monotonic()
        async for event in self._run_in_guest(
            target, command, language, time_limit, AGENT_OUTPUT_LIMIT
        ):
            if isinstance(event, OutputChunk):
                outputs[event.stream].add(event.data)
            else:
                finished = event
        if finished is None:  # the agent always ends with a result; be safe anyway
            raise ServiceError("the guest ended the run without a result")
        self._vms.telemetry.exec_finished(language.value, time.monotonic() - started)
        stdout = outputs[protocol.KIND_STDOUT].text(finished.truncated)
        stderr = outputs[protocol.KIND_STDERR].text(finished.truncated)
        if finished.timed_out:
            stderr += TIMEOUT_NOTE.format(timeout=time_limit)
        return ExecutionResult(
            stdout=stdout,
            stderr=stderr,
            exit_code=finished.exit_code,
            execution_time=finished.execution_time,
            cpu_time=finished.cpu_time,
            timed_out=finished.timed_out,
            truncated=finished.truncated or any(out.dropped for out in outputs.values()),
        )

    # -- async tasks -------------------------------------------------------------------

    async def start_task(
        self,
        owner_id: int,
        session_id: str,
        command: str,
        language: Language,
        timeout: float | None,
    ) -> ExecutionTask:
        # Checked now, so a bad request is answered at once rather than as a failed task.
        check_timeout(timeout)
        target = await session_target(self._vms, owner_id, session_id)
        async with self._db.transaction() as session:
            task = await ExecutionTaskRepository(session).add(
                ExecutionTask(
                    id=str(uuid.uuid4()),
                    owner_id=owner_id,
                    session_id=session_id,
                    vm_id=target.vm.id,
                    language=language.value,
                    command=command,
                    status=TaskStatus.RUNNING,
                    stdout="",
                    stderr="",
                    created_at=_now(),
                )
            )
        runner = asyncio.create_task(
            self._run_task(task.id, target, command, language, timeout), name=f"task:{task.id}"
        )
        self._tasks[task.id] = runner
        runner.add_done_callback(lambda _: self._tasks.pop(task.id, None))
        return task

    async def get_task(self, owner_id: int, task_id: str) -> ExecutionTask:
        async with self._db.transaction() as session:
            task = await ExecutionTaskRepository(session).get(owner_id, task_id)
        if task is None:
            raise NotFound(f"execution {task_id} not found")
        return task

    async def _run_task(
        self,
        task_id: str,
        target: GuestTarget,
        command: str,
        language: Language,
        timeout: float | None,
    ) -> None:
        try:
            result = await self.run(target, command, language, timeout)
        except asyncio.CancelledError:
            # Shielded: the write must happen although this task is being cancelled.
            await asyncio.shield(
                self._fail_task(task_id, "the server stopped while this task ran")
            )
            raise
        except ServiceError as error:
            await self._fail_task(task_id, str(error))
            return
        except Exception as error:  # a bug; the task must still end, not stay pending
            log.exception("execution task %s failed", task_id)
            await self._fail_task(task_id, f"internal error: {error!r}")
            return
        await self._finish_task(
            task_id,
            status=TaskStatus.COMPLETE,
            stdout=result.stdout,
            stderr=result.stderr,
            exit_code=result.exit_code,
            cpu_time=result.cpu_time,
            execution_time=result.execution_time,
        )

    async def _fail_task(self, task_id: str, reason: str) -> None:
        await self._finish_task(
            task_id,
            status=TaskStatus.FAILED,
            stderr=unfinished_note(reason),
            error=reason,
        )

    async def _finish_task(self, task_id: str, **fields: Any) -> None:
        async with self._db.transaction() as session:
            await ExecutionTaskRepository(session).finish_any_owner(
                task_id, TaskStatus.RUNNING, completed_at=_now(), **fields
            )
