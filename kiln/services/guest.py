"""What the services that talk to a guest share: finding the VM, translating agent errors.

Sessions, execution, files and PTYs all address a running VM either by session
id (InstaVM's routes) or by VM id (Kiln's own routes); ``GuestTarget`` is that
VM with its process. Agent failures become service errors here, in one place,
so no route ever answers 500 because a guest said no.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from kiln.runtime.driver import AgentChannel, Machine
from kiln.runtime.errors import AgentError, AgentTimeout, AgentUnavailable
from kiln.services.errors import (
    Conflict,
    GuestRefused,
    GuestTimedOut,
    GuestUnavailable,
    NotFound,
    OutOfSpace,
    Unsupported,
)
from kiln.services.telemetry import NoTelemetry, Telemetry
from kiln.services.vms import VmService
from kiln.store.models import Vm

# The agent's error codes (kiln.guest.agent.errors.ERRNO_CODES and its own) by what they mean here.
NOT_FOUND_CODES = frozenset({"ENOENT"})
CONFLICT_CODES = frozenset({"EISDIR", "ENOTDIR", "EEXIST", "EBUSY"})


@dataclass(frozen=True)
class GuestTarget:
    vm: Vm
    machine: Machine
    # Where the agent's own failures are counted (the operator's metrics).
    telemetry: Telemetry = field(default_factory=NoTelemetry)

    @property
    def agent(self) -> AgentChannel:
        return self.machine.agent

    @property
    def session_id(self) -> str:
        return self.vm.session_id


async def session_target(vms: VmService, owner_id: int, session_id: str) -> GuestTarget:
    """The running VM of a session: 404 for an unknown session, 409 if it is not running."""
    vm = await vms.session_vm(owner_id, session_id)
    return GuestTarget(vm, await vms.running_machine(owner_id, vm.id, loaded=vm), vms.telemetry)


async def vm_target(vms: VmService, owner_id: int, vm_id: str) -> GuestTarget:
    """A running VM by id: 404 for an unknown VM, 409 if it is not running."""
    vm = await vms.get(owner_id, vm_id)
    return GuestTarget(vm, await vms.running_machine(owner_id, vm_id, loaded=vm), vms.telemetry)


@contextmanager
def agent_errors(target: GuestTarget) -> Iterator[None]:
    """Turn agent failures inside the block into service errors (4xx/503).

    The agent's own failures (unreachable, no answer, an internal error, too
    old) are counted for the metrics; a guest that says no (no such file, a
    full disk, a command that ran out of time) is the request's outcome."""
    vm_id = target.vm.id
    try:
        yield
    except AgentError as error:
        if error.code in NOT_FOUND_CODES:
            raise NotFound(error.message) from error
        if error.code in CONFLICT_CODES:
            raise Conflict(error.message) from error
        if error.code == "EUNKNOWNOP":
            target.telemetry.agent_error("outdated")
            raise GuestUnavailable(
                f"vm {vm_id}: its guest agent is older than this server ({error.message}); "
                "rebuild the image (kiln images build) and start a new VM"
            ) from error
        if error.code == "ENOSPC":
            raise OutOfSpace(f"vm {vm_id}: no space left on its disk ({error.message})") from error
        if error.code == "ETIMEDOUT":
            raise GuestTimedOut(f"vm {vm_id}: {error.message}") from error
        if error.code == "ENOTSUP":
            raise Unsupported(f"vm {vm_id}: its image cannot do this: {error.message}") from error
        if error.code in ("EINTERNAL", "EIO"):
            target.telemetry.agent_error("internal")
            raise GuestUnavailable(f"vm {vm_id}: the guest agent failed: {error.message}") from error
        raise GuestRefused(error.message or error.code) from error
    except AgentTimeout as error:
        target.telemetry.agent_error("timeout")
        raise GuestUnavailable(f"vm {vm_id}: the guest agent did not answer in time") from error
    except AgentUnavailable as error:
        target.telemetry.agent_error("unreachable")
        raise GuestUnavailable(f"vm {vm_id}: the guest agent is unreachable ({error})") from error
