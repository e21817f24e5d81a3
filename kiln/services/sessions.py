"""Sessions: InstaVM's handle for a sandbox, one live VM per session id.

Creating a session is creating a VM (``VmService.create``, with its policy and
admission control); everything else here looks the session's VM up and
reports on it. A session whose VM has ended still answers (its newest VM),
so a client can see that it ended and why.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kiln.schemas.sessions import SessionCreateRequest
from kiln.schemas.vms import VMCreateRequest
from kiln.services.errors import Conflict
from kiln.services.states import VmStatus
from kiln.services.vms import VmService
from kiln.store.models import Vm

# What InstaVM's clients (the SDK's is_session_active) call a running VM.
ACTIVE = "active"
MAX_SANDBOX_LIST = 1000
DEFAULT_SANDBOX_LIST = 100


@dataclass(frozen=True)
class ProcessUsage:
    cpu_seconds: float
    rss_mb: float


@dataclass(frozen=True)
class Usage:
    vm: Vm
    process: ProcessUsage | None  # None once the VM's process is gone
    uptime_seconds: float


def read_process_usage(pid: int) -> ProcessUsage | None:
    """CPU time (user + system) and resident memory of a process, from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as stat_file:
            stat = stat_file.read()
        with open(f"/proc/{pid}/statm") as statm_file:
            resident_pages = int(statm_file.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    # The command name (field 2) is in parentheses and may hold spaces: split after it.
    fields = stat[stat.rindex(")") + 2 :].split()
    ticks = os.sysconf("SC_CLK_TCK")
    # utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    cpu_seconds = (int(fields[11]) + int(fields[12])) / ticks
    rss_mb = resident_pages * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)
    return ProcessUsage(cpu_seconds=cpu_seconds, rss_mb=rss_mb)


def public_status(vm: Vm) -> str:
    return ACTIVE if vm.status == VmStatus.RUNNING else vm.status


def vm_alive(vm: Vm) -> bool:
    """Whether the session's VM can run code now (a suspended one must be resumed first)."""
    return vm.status == VmStatus.RUNNING


class SessionService:
    def __init__(self, vms: VmService) -> None:
        self._vms = vms

    async def create(self, owner_id: int, request: SessionCreateRequest) -> Vm:
        """A new session with a running VM (waits for the guest to be ready)."""
        vm_request = VMCreateRequest(
            vm_lifetime_seconds=request.vm_lifetime_seconds,
            memory_mb=request.memory_mb,
            vcpu_count=request.vcpu_count,
            metadata=request.metadata,
            env=request.env,
        )
        return await self._vms.create(owner_id, vm_request, wait=True)

    async def get(self, owner_id: int, session_id: str) -> Vm:
        return await self._vms.session_vm(owner_id, session_id)

    async def list(
        self, owner_id: int, metadata: dict[str, Any] | None, limit: int | None
    ) -> list[Vm]:
        """Session VMs whose metadata contains ``metadata``, newest first."""
        vms = await self._vms.list(owner_id, live_only=False, metadata=metadata)
        vms.sort(key=lambda vm: vm.created_at, reverse=True)
        return vms[: limit or DEFAULT_SANDBOX_LIST]

    async def usage(self, owner_id: int, session_id: str) -> Usage:
        vm = await self._vms.session_vm(owner_id, session_id)
        process = None
        try:
            machine = await self._vms.running_machine(owner_id, vm.id)
        except Conflict:
            pass  # not running: no process to measure
        else:
            process = await asyncio.to_thread(read_process_usage, machine.pid)
        ended = vm.terminated_at or (None if vm.status != VmStatus.FAILED else vm.updated_at)
        uptime = ((ended or datetime.now(UTC)) - vm.created_at).total_seconds()
        return Usage(vm=vm, process=process, uptime_seconds=max(uptime, 0.0))

    async def kill(self, owner_id: int, session_id: str) -> Vm:
        """Terminate the session's VM (idempotent: an ended session answers as it is)."""
        vm = await self._vms.session_vm(owner_id, session_id)
        return await self._vms.terminate(owner_id, vm.id)

