"""Every event type Kiln writes, by group (``GET /v1/audit/catalog``).

A type is ``<group>.<what>``; the group is what precedes the first dot. The
VM types follow the state machine: one per status a VM enters.
"""

from __future__ import annotations

from typing import Final

CATALOG: Final[dict[str, tuple[str, ...]]] = {
    "vm": (
        "vm.created",
        "vm.running",
        "vm.suspending",
        "vm.suspended",
        "vm.resuming",
        "vm.resume_failed",
        "vm.terminating",
        "vm.terminated",
        "vm.failed",
        "vm.updated",
    ),
    "snapshot": ("snapshot.created", "snapshot.ready", "snapshot.failed", "snapshot.deleted"),
    "share": ("share.opened", "share.updated", "share.revoked", "share.deleted"),
    "volume": ("volume.attached", "volume.detached"),
    # The egress proxy added a vault's credential to a VM's outgoing request.
    "vault": ("vault.credential_used",),
    "quota": ("quota.refused", "capacity.refused"),
    "auth": ("auth.login_failed", "api_key.created", "api_key.deleted"),
    "api": ("api.call",),
    "webhook": ("webhook.test", "webhook.endpoint_created", "webhook.endpoint_deleted"),
}

# The group of each type (the catalog lists "capacity.refused" under "quota").
GROUP_OF: Final[dict[str, str]] = {kind: group for group, kinds in CATALOG.items() for kind in kinds}

STATUSES: Final[tuple[str, ...]] = ("success", "failure", "denied")


def group_of(event_type: str) -> str:
    """The group of a known type; a type not in the catalog is a programming error."""
    return GROUP_OF[event_type]
