"""A running QEMU process of one VM, as the rest of Kiln sees it."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from kiln.runtime.agent_client import AgentClient
from kiln.runtime.errors import AgentTimeout, AgentUnavailable, BootError
from kiln.runtime.qemu.ownership import Owner
from kiln.runtime.qemu.paths import RunPaths
from kiln.runtime.qemu.process import log_tail, process_runs_in
from kiln.runtime.qemu.qmp import QmpConnection


@dataclass(eq=False)
class QemuMachine:
    """A running QEMU process of one VM. Use it from one event loop."""

    vm_id: str
    pid: int
    run_dir: Path
    accel: str
    vcpu_count: int
    memory_mb: int
    agent: AgentClient
    qmp: QmpConnection
    # Set when this server started the process (then it is our child to reap).
    process: subprocess.Popen | None = field(default=None, repr=False)
    # Guest RAM is the shared file ``paths.memory_file`` (see ``memory_arguments``).
    memory_in_file: bool = False
    # The user QEMU runs as; its files are that user's (None: not confined).
    owner: Owner | None = None

    @property
    def paths(self) -> RunPaths:
        return RunPaths(self.run_dir)

    def is_alive(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        return process_runs_in(self.pid, self.run_dir)

    def failure_output(self) -> str:
        """What QEMU and the guest console said last: the reason of a failed boot."""
        parts = []
        if qemu := log_tail(self.paths.qemu_log):
            parts.append(f"QEMU output: {qemu}")
        if console := log_tail(self.paths.console_log):
            parts.append(f"guest console (tail): {console}")
        return "\n".join(parts) or "no output"

    async def wait_ready(self, timeout: float) -> dict:
        """Wait for the guest agent, failing fast with the console's last words
        if QEMU exits meanwhile. Returns the agent's ping value."""
        ready = asyncio.create_task(self.agent.wait_ready(timeout))
        try:
            while True:
                done, _ = await asyncio.wait({ready}, timeout=0.1)
                if done:
                    return ready.result()
                if not self.is_alive():
                    raise BootError(f"QEMU exited while the guest booted\n{self.failure_output()}")
        except (AgentUnavailable, AgentTimeout) as error:
            raise BootError(f"{error}\n{self.failure_output()}") from error
        finally:
            if not ready.done():
                ready.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await ready

    async def close_connections(self) -> None:
        """Drop the agent and QMP connections; the VM keeps running."""
        await self.agent.close()
        await self.qmp.close()

