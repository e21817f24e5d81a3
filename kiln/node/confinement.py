"""The confinement participant: every VM's QEMU runs as the unprivileged VM user
in a cgroup of its own (memory limit, pids limit, CPU weight), with QEMU's
seccomp sandbox on (always: ``kiln.runtime.qemu.cmdline.SANDBOX``).

It is the first participant, so the others (the network's TAP owner, volumes'
files) see ``launch.confinement``. Where the host cannot give a user (Kiln not
root) or cgroups, VMs run with what there is, and ``status`` says what is
missing (``GET /healthz``, the log at start).
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from kiln.config import Settings
from kiln.node.participant import HostResource, Launch, Ledger, VmContext
from kiln.runtime import jail
from kiln.runtime.cgroups import Limits, VmCgroups, discover
from kiln.runtime.driver import Confinement, Hypervisor, Machine

log = logging.getLogger(__name__)

CGROUP = "cgroup"
# QEMU beyond the guest's RAM: the TCG translation cache (64 MiB), device
# buffers, the migration stream's buffers, QEMU's own heap and libraries.
# Measured: a cold-booted 256 MB guest's QEMU held 264 MB RSS, a restored one 121 MB.
MEMORY_OVERHEAD_MB = 192
# QEMU's threads: one per vCPU, the main loop, I/O and RCU threads; far below this.
PIDS_LIMIT = 512
CPU_SHARES_PER_VCPU = 1024


@dataclass
class ConfinementStatus:
    user: str | None  # the VM user's name, None: QEMU runs as Kiln's own user
    cgroups: str  # "v1", "v2" or "none"
    seccomp: bool = True
    reason: str = ""

    def as_dict(self) -> dict[str, object]:
        return {"user": self.user, "cgroups": self.cgroups, "seccomp": self.seccomp, "reason": self.reason}


class ConfinementParticipant:
    name = "confinement"
    kinds = frozenset({CGROUP})
    kept_while_suspended = False

    def __init__(self, settings: Settings, hypervisor: Hypervisor) -> None:
        self._settings = settings
        self._hypervisor = hypervisor
        self._cgroups = VmCgroups(discover(settings.cgroup_parent))
        self._owner: tuple[int, int] | None = None
        self.status = ConfinementStatus(None, "none", reason="not started")

    async def start(self) -> ConfinementStatus:
        """At server start: the VM user (made when missing), the cgroup
        hierarchy, and directories QEMU must reach made traversable."""
        reasons = []
        owner = None
        if os.geteuid() == 0:
            owner, reason = await asyncio.to_thread(jail.vm_user, True)
            if reason:
                reasons.append(reason)
        else:
            reasons.append("Kiln does not run as root: QEMU runs as Kiln's own user")
        layout = self._cgroups.layout
        if not layout.usable:
            reasons.append(layout.reason)
        self._owner = owner
        self.status = ConfinementStatus(
            jail.VM_USER if owner else None, f"v{layout.version}" if layout.usable else "none", True, "; ".join(reasons)
        )
        if owner is not None:
            await asyncio.to_thread(self._open_directories)
        if reasons:
            log.warning("VM confinement is partial: %s", self.status.reason)
        return self.status

    @property
    def vm_owner(self) -> tuple[int, int] | None:
        """(uid, gid) QEMU runs as once started; None: Kiln's own user."""
        return self._owner

    # ---- hooks

    async def prepare(self, vm: VmContext, launch: Launch, ledger: Ledger) -> None:
        procs: tuple[Path, ...] = ()
        if self._cgroups.layout.usable:
            await ledger.record(HostResource(CGROUP, vm.vm_id, vm.vm_id, vm.owner_id))
            limits = Limits(
                memory_bytes=(vm.memory_mb + MEMORY_OVERHEAD_MB) * 2**20,
                pids=PIDS_LIMIT,
                cpu_weight=CPU_SHARES_PER_VCPU * vm.vcpu_count,
            )
            await asyncio.to_thread(self._cgroups.create, vm.vm_id, limits)
            procs = self._cgroups.procs_files(vm.vm_id)
        if self._owner is not None:
            launch.confinement = Confinement(uid=self._owner[0], gid=self._owner[1], cgroup_procs=procs)
            if vm.restore_from is not None:
                # Saved by an unconfined process (``kiln images build``, an older Kiln):
                # the VM user must be able to open it as QEMU does.
                await asyncio.to_thread(self._hypervisor.give_saved_state, vm.restore_from.directory, *self._owner)
        elif procs:
            # No user to switch to; the cgroup still holds it.
            launch.confinement = Confinement(uid=os.getuid(), gid=os.getgid(), cgroup_procs=procs)

    async def ready(self, vm: VmContext, machine: Machine, *, restored: bool) -> None:
        pass

    async def claimed(self, vm: VmContext, machine: Machine) -> None:
        pass

    async def release(self, vm_id: str, resources: list[HostResource], ledger: Ledger) -> None:
        for resource in resources:
            # Released after the process (participants release in reverse): the
            # cgroup is empty unless the process is still going away.
            if await asyncio.to_thread(self._cgroups.remove, resource.name):
                await ledger.forget(resource)
            else:
                log.info("vm %s: its cgroup still holds a process; the reconciler removes it later", vm_id)

    async def inventory(self) -> list[HostResource]:
        names = await asyncio.to_thread(self._cgroups.names)
        return [HostResource(CGROUP, name, name) for name in sorted(names)]

    # ---- for tests and diagnostics

    def memory_limit_of(self, vm_id: str) -> int | None:
        return self._cgroups.memory_limit(vm_id)

    def members_of(self, vm_id: str) -> set[int]:
        return self._cgroups.members(vm_id)

    def _open_directories(self) -> None:
        """Kiln's data and cache dirs: traversable by the VM user, never listable
        (0711), nothing more; what is inside is each file's own business."""
        settings = self._settings
        for directory in (
            settings.data_dir, settings.vms_dir, settings.snapshots_dir, settings.volumes_dir,
            settings.data_dir / "imports", settings.cache_dir, settings.cache_dir / "base-snapshots",
        ):  # fmt: skip
            directory.mkdir(parents=True, exist_ok=True)
            directory.chmod(0o711)
