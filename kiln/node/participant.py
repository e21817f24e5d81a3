"""The seam every per-VM host mechanism plugs into: participants of the lifecycle pipeline.

Every way a VM comes up (cold boot, restore, pool fill, clone, resume) or goes
away (delete, expiry, failure, suspend, a crash found at start) runs the same
sequence over a list of participants (``kiln.node.pipeline``). A participant
owns one kind of host resource per VM (the QEMU process and its run dir, a
cgroup, a network namespace with its links and rules, a volume attachment) and
implements the same few hooks for it. A new mechanism adds a participant; it
does not add code to the ten paths.

Host resources are rows before they exist: a participant calls
``ledger.record`` before it creates a resource and ``ledger.forget`` after it
removed it, so that after a crash at any step the reconciler finds every
resource Kiln made (``inventory``) and removes what no live VM owns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from kiln.runtime.driver import BootImage, Confinement, Machine, Nic, SavedState, ScsiDrive


@dataclass(frozen=True)
class HostResource:
    """One thing on the host that Kiln made for one VM.

    ``kind`` names the participant's resource type (``netns``, ``cgroup``, ...),
    ``name`` is unique within its kind on this host (a namespace's name, a
    cgroup's path), ``detail`` is what the participant needs to release or
    check it later without any other state (kept as JSON)."""

    kind: str
    name: str
    vm_id: str
    owner_id: int | None = None
    detail: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


class Ledger(Protocol):
    """Where host resources are recorded (the store, behind the service layer)."""

    async def record(self, *resources: HostResource) -> None:
        """Called before the resources are created; idempotent."""
        ...

    async def forget(self, *resources: HostResource) -> None:
        """Called once the resources are gone; idempotent."""
        ...

    async def of_vm(self, vm_id: str) -> list[HostResource]: ...

    async def all(self) -> list[HostResource]: ...


@dataclass(frozen=True)
class EgressRules:
    """The egress policy of a VM as the node enforces it (checked by the service layer)."""

    allowed_cidrs: tuple[str, ...] = ()
    # Reachable over the schemes allowed below.
    allowed_domains: tuple[str, ...] = ()
    allow_http: bool = False
    allow_https: bool = False
    # Reachable over HTTP and HTTPS whatever the two flags say (the package
    # managers' registries: apt speaks HTTP, pip and npm HTTPS).
    web_domains: tuple[str, ...] = ()


@dataclass(frozen=True)
class Mount:
    """A volume the VM mounts (``volumes`` of a create, a hot attach, or the
    mounts a snapshot recorded)."""

    volume_id: str
    mount_path: str
    read_only: bool
    checkpoint_id: str | None = None


@dataclass(frozen=True)
class SavedDrive:
    """A volume drive a saved VM had (``Mount`` plus where it sat): a restore
    of that save needs a drive at the same SCSI target, with the same id, whose
    content is what the drive held at the save (the checkpoint
    ``source_checkpoint_id`` of the volume). The restored VM swaps it for the
    real mount once it is up."""

    volume_id: str
    mount_path: str
    read_only: bool
    checkpoint_id: str | None  # the mount's own checkpoint (None: the volume itself)
    drive_id: str
    scsi_id: int
    source_checkpoint_id: str

    @property
    def mount(self) -> Mount:
        return Mount(self.volume_id, self.mount_path, self.read_only, self.checkpoint_id)


@dataclass(frozen=True)
class VmContext:
    """Everything the pipeline knows about one VM it brings up or takes down."""

    vm_id: str
    owner_id: int | None  # None: not a user's VM (a pool VM, a base-snapshot build, an import)
    vcpu_count: int
    memory_mb: int
    image: BootImage
    run_dir: Path
    restore_from: SavedState | None = None
    memory_in_file: bool = False
    # None: the VM has no network at all (its card is unwired).
    egress: EgressRules | None = None
    mounts: tuple[Mount, ...] = ()
    # The volume drives ``restore_from`` was saved with (a user's snapshot of
    # a VM that had volumes mounted); empty for a resume, whose drives are its own.
    saved_drives: tuple[SavedDrive, ...] = ()
    # A suspended VM coming back: a failed start keeps what participants keep
    # while a VM is suspended (``Participant.kept_while_suspended``).
    resuming: bool = False
    hostname: str | None = None  # default: the vm_id


@dataclass
class Launch:
    """What participants contribute to the VM's process before it starts."""

    nic: Nic | None = None
    scsi_drives: list[ScsiDrive] = field(default_factory=list)
    confinement: Confinement | None = None
    # File descriptors the participant opened for the process; closed in this
    # process once it started (or failed to).
    owned_fds: list[int] = field(default_factory=list)


class Participant(Protocol):
    """One mechanism's part in every VM's life. Hooks run in the order the
    participants are listed when a VM comes up, and in reverse when it goes."""

    name: str
    kinds: frozenset[str]  # the HostResource kinds it owns
    # True: its resources belong to the VM's saved state too (a suspended VM's
    # volume attachments: its saved devices hold them). A suspend leaves them,
    # the reconciler counts suspended VMs as their owners, and only the VM's
    # end releases them.
    kept_while_suspended: bool

    async def prepare(self, vm: VmContext, launch: Launch, ledger: Ledger) -> None:
        """Before the process starts: check, reserve and create host resources
        (each recorded first), and add what the process needs to ``launch``.
        Raise to refuse; whatever was recorded is released."""
        ...

    async def ready(self, vm: VmContext, machine: Machine, *, restored: bool) -> None:
        """The guest's agent answers (after a cold boot, or a restore, where the
        guest wakes up with its source's identity): configure the guest side
        (addresses, mounts). Raise to fail the start."""
        ...

    async def claimed(self, vm: VmContext, machine: Machine) -> None:
        """A pool VM becomes a user's VM ``vm`` (same vm_id): apply what is the
        user's own (egress policy, mounts). Raise to fail the create."""
        ...

    async def release(self, vm_id: str, resources: list[HostResource], ledger: Ledger) -> None:
        """Remove the VM's resources of this participant's kinds (as recorded)
        and forget each. Idempotent; never raises for something already gone."""
        ...

    async def inventory(self) -> list[HostResource]:
        """What of its kinds exists on this host now that Kiln made (by name;
        ``vm_id`` may be empty when the name does not tell). The reconciler
        removes whatever no live VM owns."""
        ...
