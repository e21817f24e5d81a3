"""Wire models of the session routes (API.md, "Sessions and execution").

A session is InstaVM's handle for "my sandbox": ``POST /v1/sessions/session``
creates a VM for a new session id, and the other routes find that VM by it.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel

from kiln.schemas.bodies import RequestBody
from kiln.schemas.vms import JsonObject, VmRow


class SessionCreateRequest(RequestBody):
    # The instavm SDK authenticates this one call with its key in the body.
    api_key: str | None = None
    vm_lifetime_seconds: int | None = None
    memory_mb: int | None = None
    vcpu_count: int | None = None
    metadata: JsonObject | None = None
    env: dict[str, str] | None = None


class SessionCreateResponse(BaseModel):
    session_id: str
    vm_id: str
    status: str


class SessionRecord(BaseModel):
    """A session and its VM (the live one, else the newest)."""

    session_id: str
    vm_id: str
    status: str
    vcpu_count: int
    memory_mb: int
    metadata: JsonObject
    created_at: datetime
    expires_at: datetime
    failure_reason: str | None

    @classmethod
    def from_row(cls, vm: VmRow) -> SessionRecord:
        return cls(
            session_id=vm.session_id,
            vm_id=vm.id,
            status=vm.status,
            vcpu_count=vm.vcpu_count,
            memory_mb=vm.memory_mb,
            metadata=vm.labels,
            created_at=vm.created_at,
            expires_at=vm.expires_at,
            failure_reason=vm.failure_reason,
        )


class SessionStatus(BaseModel):
    session_id: str
    vm_id: str
    # "active" while the VM runs (what the SDK's is_session_active looks for),
    # otherwise the VM's own status (creating, terminated, failed, ...).
    vm_status: str
    # What the SDK's OpenAI Agents sandbox reads to decide whether to reuse the
    # session: it exists (an unknown one is 404), a VM backs it (always, in
    # Kiln: a session is made with its VM), and that VM is running.
    exists: bool = True
    vm_assigned: bool = True
    vm_alive: bool


class SessionUsage(BaseModel):
    session_id: str
    vm_id: str
    status: str
    # CPU time the VM's QEMU process has used; null once the VM is gone.
    cpu_seconds: float | None
    memory_mb: int
    # Resident memory of the QEMU process; null once the VM is gone.
    rss_mb: float | None
    vcpu_count: int
    uptime_seconds: float
    # From the usage ledger: everything the session's VMs ran, what they were given.
    vcpu_seconds: float
    memory_gib_seconds: float
    disk_gib_seconds: float
    disk_gib_hours: float


class KillRequest(RequestBody):
    session_id: str


class KillResponse(BaseModel):
    success: bool
    vm_id: str
