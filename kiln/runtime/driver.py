"""The hypervisor-neutral contract between the service layer and a VM runtime.

QEMU specifics live in ``qemu.py``; a Firecracker driver would implement the same
``Hypervisor`` protocol. Nothing here knows about HTTP, users or the database.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class BootImage:
    """A built image variant: what a cold boot needs."""

    variant: str
    kernel: Path
    initrd: Path
    rootfs: Path  # immutable base disk; each VM writes to its own overlay on top
    cmdline: str


@dataclass(frozen=True)
class SavedState:
    """A saved VM (snapshot): guest memory/device state plus the disk it belongs to.

    The files in ``directory`` are immutable once saved; any number of VMs may be
    restored from them at once, each writing to its own overlay."""

    directory: Path
    memory_mb: int
    vcpu_count: int
    # The guest RAM as a plain file, when it was saved that way: restored VMs map
    # it copy-on-write, so pages none of them wrote are shared between them.
    # None: the memory is inside the device-state stream.
    memory_file: Path | None = None
    # The frozen disk: restored VMs get an overlay on top of it.
    disk: Path | None = None
    # The disk's virtual size (what a restored VM's overlay may grow to; 0: unknown).
    disk_bytes: int = 0


class SaveOutcome(StrEnum):
    """What became of a save that a crash of the server cut short."""

    UNDONE = "undone"  # the VM runs as before it; the save's directory is gone
    DISK_KEPT = "disk_kept"  # the VM runs on top of the save's disk (keep it); its memory was not saved
    COMPLETED = "completed"  # the save is whole (a stopping save: the VM's process is gone)
    LOST = "lost"  # the VM's process died before its state was saved: nothing to continue


@dataclass(frozen=True)
class SaveRecovery:
    outcome: SaveOutcome
    saved: SavedState | None = None


# Every guest sees the same NIC: the same MAC, and (inside the VM's own network
# namespace) the same address, so a VM restored from a snapshot or claimed from
# the pool needs no re-addressing and a clone cannot collide with its source.
GUEST_MAC = "52:54:00:4b:49:4c"


@dataclass(frozen=True)
class Nic:
    """The VM's network card. Every VM has one (a saved VM restores only into the
    same set of devices); ``tap_fd`` is an open TAP device the host wired for it,
    or None for a card whose cable leads nowhere (no network at all)."""

    tap_fd: int | None = None
    mac: str = GUEST_MAC


@dataclass(frozen=True)
class ScsiDrive:
    """A block device on the VM's virtio-scsi bus (a volume), attached at start."""

    drive_id: str  # QEMU node and device id; also the disk's serial the guest sees
    path: Path
    read_only: bool = False
    image_format: str = "qcow2"
    # The SCSI target: a restore needs each drive where the saved VM had it
    # (hot detaches leave gaps). None: QEMU picks the next free one.
    scsi_id: int | None = None


@dataclass(frozen=True)
class Confinement:
    """What the VM's process runs as: an unprivileged user and the cgroups
    (their ``cgroup.procs`` files) it joins before it executes QEMU."""

    uid: int
    gid: int
    cgroup_procs: tuple[Path, ...] = ()


@dataclass(frozen=True)
class MachineSpec:
    vm_id: str
    vcpu_count: int
    memory_mb: int
    image: BootImage
    run_dir: Path
    # When set, the VM continues from this saved state instead of booting.
    restore_from: SavedState | None = None
    # Keep guest RAM in a shared file in the run dir, so a final save
    # (``keep_running=False``) takes that file as the snapshot's memory without
    # streaming it; used for VMs booted to make a base snapshot.
    memory_in_file: bool = False
    nic: Nic = Nic()
    scsi_drives: tuple[ScsiDrive, ...] = ()
    confinement: Confinement | None = None


class AgentChannel(Protocol):
    """The host end of a guest agent (``kiln.runtime.agent_client.AgentClient``).

    Failures are the ``kiln.runtime.errors`` agent errors: ``AgentError`` (the
    agent said no), ``AgentTimeout`` (no answer within the deadline: every call
    has one), ``AgentUnavailable`` (no connection)."""

    @property
    def connected(self) -> bool: ...

    # Why the guest's agent is no longer talked to (it broke the protocol's
    # limits: floods, garbage), or None.
    misbehaving: str | None

    @property
    def in_flight(self) -> int:
        """Requests sent and not answered yet (a running exec, an attached terminal)."""
        ...

    async def call(self, op: str, timeout: float | None = None, **args: object) -> dict: ...

    def stream(self, op: str, timeout: float | None = None, **args: object) -> AsyncIterator[dict]: ...

    async def wait_ready(self, timeout: float) -> dict: ...

    async def close(self) -> None: ...


class Machine(Protocol):
    """A started VM process."""

    vm_id: str
    pid: int
    run_dir: Path

    @property
    def agent(self) -> AgentChannel: ...

    async def wait_ready(self, timeout: float) -> dict:
        """Wait for the guest agent's ping; BootError (with the console's last
        words) if it does not answer in time or the VM process exits meanwhile."""
        ...

    async def close_connections(self) -> None:
        """Drop this server's agent and control connections; the VM keeps running."""
        ...


class Hypervisor(Protocol):
    """Starts, adopts and stops VM processes."""

    @property
    def accel(self) -> str:
        """"kvm" or "tcg" once decided (after probing); "auto" before."""
        ...

    async def decide_accel(self, image: BootImage) -> str:
        """Probe (once per process) and return the accelerator VMs will use."""
        ...

    async def start(self, spec: MachineSpec) -> Machine:
        """Start the VM process; returns once it runs (the agent may not answer yet).

        On failure nothing is left behind: no process, no run dir contents but the
        console log (kept for the failure reason)."""
        ...

    async def adopt(self, vm_id: str, run_dir: Path) -> Machine | None:
        """Re-attach to a VM process started by an earlier server; None if it is gone."""
        ...

    def is_running(self, machine: Machine) -> bool: ...

    async def destroy(self, vm_id: str, run_dir: Path) -> None:
        """Stop the VM's process if any and remove its run dir. Idempotent."""
        ...

    async def save(self, machine: Machine, directory: Path, *, keep_running: bool = True) -> SavedState:
        """Save the VM's memory, device state and disk into ``directory`` (made here).

        The guest is paused meanwhile. With ``keep_running`` it then continues on a
        new overlay on top of the saved disk; without, its process is stopped (the
        run dir stays, for the caller to destroy). The saved files are read-only."""
        ...

    def saved_state(self, directory: Path) -> SavedState:
        """The SavedState that ``save`` wrote into ``directory``; RuntimeFailure if none."""
        ...

    async def flatten_saved_disk(self, directory: Path) -> None:
        """Rewrite the saved disk so that it no longer needs the saved disks under
        it (only the image's), with the same content. VMs running on the old file
        keep it (they hold it open); new restores use the new one."""
        ...

    async def rebase_saved_disk(self, directory: Path, backing: Path) -> None:
        """Make the saved disk read its base from ``backing``: the image file it
        was written on, moved (same content), e.g. into the save's own directory.
        No VM may run on the saved disk yet."""
        ...

    async def copy_saved(self, source: Path, target: Path) -> None:
        """Copy the finished save in ``source`` to ``target`` (made here): the
        same VM, its disk standing on no other save's, so that either may be
        removed first."""
        ...

    async def recover_save(
        self, machine: Machine | None, run_dir: Path, directory: Path, *, keep_running: bool
    ) -> SaveRecovery:
        """Settle a save into ``directory`` of the VM in ``run_dir`` that a crash
        of the server cut short (``machine``: the VM adopted, None if its process
        is gone); the guest runs on if it still can."""
        ...

    def disk_growth_left(self, machine: Machine) -> int:
        """How many more bytes the VM's disk may take on the host (blocking)."""
        ...

    async def grow_root_disk(self, machine: Machine, size_bytes: int) -> None:
        """Make the running VM's root disk ``size_bytes`` large (never smaller);
        the guest sees a bigger block device, its file system is the caller's."""
        ...

    def cap_console(self, run_dir: Path) -> bool:
        """Keep the VM's console log under its cap (blocking); True if it was cut."""
        ...

    def give_saved_state(self, directory: Path, uid: int, gid: int) -> None:
        """Make a saved state the files of the user VMs run as (blocking), so
        that a confined VM can restore it; a no-op when they already are."""
        ...

    def console_tail(self, run_dir: Path, max_bytes: int) -> str:
        """The last ``max_bytes`` of the VM's serial console (blocking; "" if none)."""
        ...

    def running_under(self, directory: Path) -> dict[int, Path]:
        """VM processes whose run dirs are directly under ``directory``: pid -> run dir
        (also those whose run dir is gone)."""
        ...
