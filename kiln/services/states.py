"""The states of VMs and snapshots, and which transitions exist (a leaf module:
every service names them, none has to import another for them)."""

from __future__ import annotations

from enum import StrEnum


class VmStatus(StrEnum):
    CREATING = "creating"
    RUNNING = "running"
    SUSPENDING = "suspending"
    SUSPENDED = "suspended"
    RESUMING = "resuming"
    TERMINATING = "terminating"
    TERMINATED = "terminated"
    FAILED = "failed"


S = VmStatus
TRANSITIONS: dict[VmStatus, frozenset[VmStatus]] = {
    S.CREATING: frozenset({S.RUNNING, S.TERMINATING, S.FAILED}),
    S.RUNNING: frozenset({S.SUSPENDING, S.TERMINATING, S.FAILED}),
    # Back to running: a suspend that failed or that a crash cut short, undone.
    S.SUSPENDING: frozenset({S.SUSPENDED, S.RUNNING, S.FAILED}),
    S.SUSPENDED: frozenset({S.RESUMING, S.TERMINATING, S.FAILED}),
    # Back to suspended: a resume that failed keeps the saved state (retryable).
    S.RESUMING: frozenset({S.RUNNING, S.SUSPENDED, S.FAILED}),
    S.TERMINATING: frozenset({S.TERMINATED, S.FAILED}),
    # A failed VM has no process left; deleting it records that the user is done with it.
    S.FAILED: frozenset({S.TERMINATING}),
    S.TERMINATED: frozenset(),
}

# What GET /v1/vms lists and what the reaper expires (InstaVM's "live").
LIVE_STATUSES = frozenset({S.CREATING, S.RUNNING, S.SUSPENDED})
# States in which a VM process exists or is being made or removed.
RESOURCE_HOLDING_STATUSES = frozenset(
    {S.CREATING, S.RUNNING, S.SUSPENDING, S.RESUMING, S.TERMINATING}
)
# States that hold host resources or a saved state a resume needs (admission
# and quotas count them: a suspended VM comes back with its memory).
ADMITTED_STATUSES = RESOURCE_HOLDING_STATUSES | {S.SUSPENDED}
ENDED_STATUSES = frozenset({S.TERMINATED, S.FAILED})
# States in which a VM still has a disk written on top of its disk_snapshot_id.
STATES_WITH_A_DISK = frozenset(VmStatus) - ENDED_STATUSES


def can_transition(current: str, target: VmStatus) -> bool:
    return target in TRANSITIONS[VmStatus(current)]


class SnapshotType(StrEnum):
    USER = "user"
    AUTO = "auto"
    BASE = "base"
    # Published by the operator (POST /v1/system-snapshots): no owner, listed
    # for and usable by every user, removed only by the operator.
    SYSTEM = "system"
    # A suspended VM's saved state. Never listed; removed with its VM.
    SUSPEND = "suspend"
    # A failed snapshot the user deleted while a VM still runs on its disk:
    # only the disk is left, never listed, removed once nothing stands on it.
    LAYER = "layer"
    # A build or import of the operator's on its way to a system snapshot
    # (POST /v1/snapshots with type system): never listed; removed once copied
    # into the system snapshot or failed, and at the next start.
    STAGING = "staging"


class SnapshotStatus(StrEnum):
    CREATING = "creating"
    READY = "ready"
    FAILED = "failed"


# What GET /v1/snapshots shows and ?type= accepts.
LISTED_TYPES = (SnapshotType.USER, SnapshotType.BASE, SnapshotType.AUTO, SnapshotType.SYSTEM)
# Listed for every user; no user owns them (kiln.store.repositories.PUBLIC_SNAPSHOT_TYPES).
PUBLIC_TYPES = (SnapshotType.BASE, SnapshotType.SYSTEM)
# Saved states the collector may remove once nothing depends on them.
COLLECTABLE_TYPES = (SnapshotType.SUSPEND, SnapshotType.LAYER)
