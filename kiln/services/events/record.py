"""Writing events, inside the caller's transaction (the outbox rule).

A service that changes something calls ``record`` with the session that makes
the change: the event commits with it or not at all. Refusals (a quota, a
login) change nothing, so ``record_alone`` writes them in a transaction of
their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from kiln.services.events.catalog import group_of
from kiln.services.webhooks.fanout import fan_out
from kiln.store.db import Database
from kiln.store.events import EventRepository
from kiln.store.models import Event, Share, Snapshot, VaultCall, Vm, VolumeMount, utc_now

# A payload is for the audit log and webhooks: keep it a summary, never a dump.
MAX_ERROR_CHARS = 4000


@dataclass(frozen=True)
class NewEvent:
    event_type: str
    owner_id: int | None
    status: str = "success"
    vm_id: str | None = None
    session_id: str | None = None
    resource_type: str | None = None
    resource_id: str | None = None
    payload: dict[str, Any] = field(default_factory=dict)
    error_message: str | None = None
    # "user": the owner asked for it; "system": the server's own loops did it.
    actor_type: str = "system"
    actor_id: str | None = None


async def record(session: AsyncSession, new: NewEvent) -> Event:
    """Add the event, and a delivery for each webhook endpoint that wants it."""
    error = new.error_message[:MAX_ERROR_CHARS] if new.error_message else None
    event = await EventRepository(session).add(
        Event(
            created_at=utc_now(),
            owner_id=new.owner_id,
            actor_type=new.actor_type,
            actor_id=new.actor_id,
            event_group=group_of(new.event_type),
            event_type=new.event_type,
            status=new.status,
            vm_id=new.vm_id,
            session_id=new.session_id,
            resource_type=new.resource_type,
            resource_id=new.resource_id,
            payload=new.payload,
            error_message=error,
        )
    )
    await fan_out(session, event)
    return event


async def record_alone(db: Database, new: NewEvent) -> None:
    async with db.transaction() as session:
        await record(session, new)


def by_user(owner_id: int) -> dict[str, Any]:
    """The actor fields of an event a user's request caused."""
    return {"actor_type": "user", "actor_id": str(owner_id)}


def vm_event(vm: Vm, event_type: str, **fields: Any) -> NewEvent:
    """An event about ``vm``, owned by its owner."""
    return NewEvent(
        event_type=event_type,
        owner_id=vm.owner_id,
        vm_id=vm.id,
        session_id=vm.session_id,
        resource_type="vm",
        resource_id=vm.id,
        **fields,
    )


def snapshot_event(snapshot: Snapshot, event_type: str, **fields: Any) -> NewEvent:
    """An event about a user's snapshot (base and internal saves have none)."""
    payload = {"name": snapshot.name, "type": snapshot.type, "size_bytes": snapshot.size_bytes}
    return NewEvent(
        event_type=event_type,
        owner_id=snapshot.owner_id,
        vm_id=snapshot.source_vm_id,
        resource_type="snapshot",
        resource_id=snapshot.id,
        payload=payload,
        **fields,
    )


def share_event(share: Share, event_type: str, **fields: Any) -> NewEvent:
    payload = {"port": share.port, "is_public": share.is_public, "status": share.status}
    return NewEvent(
        event_type=event_type,
        owner_id=share.owner_id,
        vm_id=share.vm_id,
        resource_type="share",
        resource_id=share.id,
        payload=payload,
        **by_user(share.owner_id),
        **fields,
    )


def mount_event(mount: VolumeMount, event_type: str, **fields: Any) -> NewEvent:
    """A volume attached to (or detached from) a VM; ``payload`` adds to the mount's."""
    payload = {
        "volume_id": mount.volume_id,
        "mount_path": mount.mount_path,
        "mode": mount.mode,
        "checkpoint_id": mount.checkpoint_id,
        **fields.pop("payload", {}),
    }
    return NewEvent(
        event_type=event_type,
        owner_id=mount.owner_id,
        vm_id=mount.vm_id,
        resource_type="volume",
        resource_id=mount.volume_id,
        payload=payload,
        **fields,
    )


def vault_call_event(call: VaultCall) -> NewEvent:
    """The egress proxy injected a vault's credential into a VM's request (never its value)."""
    return NewEvent(
        event_type="vault.credential_used",
        owner_id=call.owner_id,
        # failure: no answer from the service (its error says why); any HTTP status is an answer.
        status="success" if call.error is None else "failure",
        vm_id=call.vm_id,
        resource_type="vault",
        resource_id=call.vault_id,
        payload={
            "call_id": call.id,
            "credential_id": call.credential_id,
            "credential_name": call.credential_name,
            "service_id": call.service_id,
            "host": call.host,
            "method": call.method,
            "path": call.path,
            "status_code": call.status,
        },
        error_message=call.error,
    )
