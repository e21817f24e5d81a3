"""Running the guest's tools (busybox ``ip``/``mount``/``umount``/``sync``,
``e2fsck``) for the system ops: bounded by a deadline, output kept for the reply.

The image's own tools are not relied on where busybox has one: an imported OCI
image may have no iproute2 or util-linux, but every Kiln guest has
``/opt/kiln/busybox``."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from dataclasses import dataclass

from .deadlines import Deadline
from .errors import AgentError

# Tools run with a fixed environment: the user's set_env must not change them.
TOOL_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C"}
# What a reply quotes of a tool's output at most (its end: where errors are).
OUTPUT_TAIL_CHARS = 4000
# After SIGKILL at the deadline: a process stuck in the kernel (a hung disk)
# cannot die; it is reaped later in the background rather than waited for.
KILL_WAIT_SECONDS = 1.0


@dataclass(frozen=True)
class ToolResult:
    exit_code: int  # minus the signal number when a signal ended it
    output: str  # stdout and stderr together, the tail of it


def run_tool(argv: list[str], deadline: Deadline, doing: str) -> ToolResult:
    """Run ``argv`` to its end or the deadline (then its process group is killed
    and the op fails with ETIMEDOUT). ENOTSUP when the program is not there."""
    deadline.check(doing)
    try:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=TOOL_ENV,
            start_new_session=True,
        )
    except FileNotFoundError:
        raise AgentError("ENOTSUP", f"{doing} needs {argv[0]}, which this guest does not have") from None
    try:
        output, _ = process.communicate(timeout=deadline.remaining())
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            process.communicate(timeout=KILL_WAIT_SECONDS)
        except subprocess.TimeoutExpired:
            threading.Thread(target=process.wait, name="reap-tool", daemon=True).start()
        raise AgentError(
            "ETIMEDOUT", f"timed out after {deadline.seconds:g} s {doing} ({argv[0]} killed)"
        ) from None
    text = output.decode("utf-8", "replace").strip()
    return ToolResult(process.returncode, text[-OUTPUT_TAIL_CHARS:])
