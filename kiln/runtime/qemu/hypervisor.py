"""``QemuHypervisor``: the ``kiln.runtime.driver.Hypervisor`` of QEMU's ``microvm``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shlex
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from kiln.config import Settings
from kiln.runtime import jail
from kiln.runtime.agent_client import AgentClient
from kiln.runtime.driver import BootImage, Machine, MachineSpec, SavedState, SaveRecovery
from kiln.runtime.errors import BootError
from kiln.runtime.qemu import console, disks, ownership, saving
from kiln.runtime.qemu.cmdline import QEMU_BINARY, build_argv, tcg_kernel_arguments
from kiln.runtime.qemu.machine import QemuMachine
from kiln.runtime.qemu.ownership import Owner
from kiln.runtime.qemu.paths import MAX_SOCKET_PATH, RunPaths, SavedPaths
from kiln.runtime.qemu.process import (
    log_tail,
    process_runs_in,
    qemu_processes_under,
    read_pid,
    signal_and_wait,
)
from kiln.runtime.qemu.qmp import QemuError, QmpConnection

log = logging.getLogger(__name__)

# A KVM boot that has not reached a ready agent in this time is not going to:
# on hosts where KVM works, the probe VM is ready in well under a second.
KVM_PROBE_SECONDS = 6.0
# QEMU opens its QMP socket before the guest runs; this only waits for start-up.
QMP_READY_SECONDS = 15.0
# QEMU makes its QMP socket 65-130 ms after spawn; a restore waits for it, so
# look often (a 50 ms poll cost up to 50 ms per restore).
QMP_POLL_SECONDS = 0.005
STOP_GRACE_SECONDS = 2.0

_accel_decision: str | None = None  # the probe's answer, for the life of the process


class QemuHypervisor:
    def __init__(self, settings: Settings, *, binary: str = QEMU_BINARY) -> None:
        self.settings = settings
        self.binary = binary
        self._machines: dict[str, QemuMachine] = {}
        self._probe_lock: asyncio.Lock | None = None
        self._tcg_arguments = tcg_kernel_arguments()

    @property
    def accel(self) -> str:
        """"kvm" or "tcg" once decided; "auto" until the first start or probe."""
        if self.settings.accel == "tcg":
            return "tcg"
        return _accel_decision or self.settings.accel

    # -- start

    async def start(self, spec: MachineSpec) -> QemuMachine:
        accel = await self.decide_accel(spec.image)
        if spec.restore_from is not None:
            saving.check_restorable(spec, accel, saving.read_saved_description(spec.restore_from.directory))
        return await self._launch(spec, accel)

    async def _launch(self, spec: MachineSpec, accel: str) -> QemuMachine:
        paths = RunPaths(spec.run_dir.resolve())
        self._check_can_start(spec, paths)
        paths.root.mkdir(parents=True, exist_ok=True)
        confinement = spec.confinement
        owner = Owner(confinement.uid, confinement.gid) if confinement is not None else None
        ownership.give(paths.root, owner, ownership.RUN_DIR_MODE)
        process: subprocess.Popen | None = None
        machine: QemuMachine | None = None
        try:
            if spec.restore_from is not None:
                await saving.create_overlay_on_saved_disk(spec.restore_from, paths.overlay)
            else:
                await disks.create_overlay(paths.overlay, Path(spec.image.rootfs))
            ownership.give(paths.overlay, owner, ownership.DISK_MODE)
            self._write_machine_file(spec, accel, paths, owner)
            argv = build_argv(
                spec, accel, paths, binary=self.binary, tcg_arguments=self._tcg_arguments
            )
            log.info("starting VM %s: %s", spec.vm_id, shlex.join(argv))
            with paths.qemu_log.open("wb") as qemu_log:
                process = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=qemu_log,
                    stderr=subprocess.STDOUT,
                    cwd=paths.root,
                    start_new_session=True,  # survives a restart (and a Ctrl-C) of the server
                    pass_fds=() if spec.nic.tap_fd is None else (spec.nic.tap_fd,),
                    # Joins its cgroups, sees only Kiln's dirs, drops to its user (kiln.runtime.jail).
                    preexec_fn=self._confine(spec, accel) if confinement is not None else None,
                )
            machine = QemuMachine(
                vm_id=spec.vm_id,
                pid=process.pid,
                run_dir=paths.root,
                accel=accel,
                vcpu_count=spec.vcpu_count,
                memory_mb=spec.memory_mb,
                agent=AgentClient(paths.agent_socket, self.settings.agent_deadline_seconds),
                qmp=QmpConnection(paths.qmp_socket, f"qmp-{spec.vm_id}"),
                process=process,
                memory_in_file=spec.memory_in_file,
                owner=owner,
            )
            await self._wait_for_qmp(machine)
            if spec.restore_from is not None:
                await saving.load_saved_state(machine, spec.restore_from)
        except BaseException as error:
            # Nothing half-made: no process, no disk, no sockets; the console log stays.
            reason = machine.failure_output() if machine else log_tail(paths.qemu_log)
            if machine is not None:
                await machine.close_connections()
            if process is not None:
                await signal_and_wait(process.pid, grace=0)
                process.wait()
            self._remove_all_but_the_console(paths)
            if isinstance(error, BootError) or not isinstance(error, Exception):
                raise
            raise BootError(f"cannot start VM {spec.vm_id}: {error}\n{reason}") from error
        self._machines[spec.vm_id] = machine
        return machine

    def _check_can_start(self, spec: MachineSpec, paths: RunPaths) -> None:
        for required in (spec.image.kernel, spec.image.initrd, spec.image.rootfs):
            if not Path(required).is_file():
                raise BootError(f"image {spec.image.variant!r} is missing {required}")
        for socket_path in (paths.agent_socket, paths.qmp_socket):
            if len(str(socket_path)) > MAX_SOCKET_PATH:
                raise BootError(f"socket path too long for a unix socket: {socket_path}")
        pid = read_pid(paths.pid_file)
        if pid is not None and process_runs_in(pid, paths.root):
            raise BootError(f"VM {spec.vm_id} is already running as pid {pid}")

    def _confine(self, spec: MachineSpec, accel: str) -> Callable[[], None]:
        confinement = spec.confinement
        assert confinement is not None
        # What QEMU opens by path: its image, what it restores, and Kiln's dirs.
        needed = [self.settings.data_dir, self.settings.cache_dir, spec.run_dir]
        needed += [Path(path).resolve().parent for path in (spec.image.kernel, spec.image.initrd, spec.image.rootfs)]
        needed += [drive.path.parent for drive in spec.scsi_drives]
        if spec.restore_from is not None:
            needed.append(spec.restore_from.directory)
            # And what its disk is backed by: a suspended VM's save names its
            # base snapshot, which may live elsewhere (a cache of links).
            chain = disks.backing_chain(SavedPaths(spec.restore_from.directory).disk)
            needed += [path.resolve().parent for path in chain]
        reveals = jail.plan_view(needed, confinement.uid, confinement.gid)
        kvm = jail.kvm_group()
        groups = [kvm] if accel == "kvm" and kvm is not None else []
        return jail.preexec(confinement.uid, confinement.gid, groups, confinement.cgroup_procs, reveals)

    def _write_machine_file(self, spec: MachineSpec, accel: str, paths: RunPaths, owner: Owner | None) -> None:
        description = {
            "vm_id": spec.vm_id,
            "vcpu_count": spec.vcpu_count,
            "memory_mb": spec.memory_mb,
            "accel": accel,
            "image": {
                "variant": spec.image.variant,
                "kernel": str(spec.image.kernel),
                "initrd": str(spec.image.initrd),
                "rootfs": str(spec.image.rootfs),
                "cmdline": spec.image.cmdline,
            },
            "memory_in_file": spec.memory_in_file,
            "owner": [owner.uid, owner.gid] if owner is not None else None,
            "restored_from": str(spec.restore_from.directory) if spec.restore_from else None,
            "started_at": time.time(),
        }
        paths.machine_file.write_text(json.dumps(description, indent=2) + "\n")

    async def _wait_for_qmp(self, machine: QemuMachine) -> None:
        deadline = time.monotonic() + QMP_READY_SECONDS
        while True:
            if not machine.is_alive():
                raise BootError(f"QEMU exited at start-up\n{machine.failure_output()}")
            if machine.paths.qmp_socket.exists():
                with contextlib.suppress(QemuError):
                    await machine.qmp.connect()
                    return
            if time.monotonic() > deadline:
                raise BootError(f"QMP did not answer within {QMP_READY_SECONDS:g}s")
            await asyncio.sleep(QMP_POLL_SECONDS)

    def _remove_all_but_the_console(self, paths: RunPaths) -> None:
        for path in paths.everything_but_the_console():
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)

    # -- accelerator

    async def decide_accel(self, image: BootImage) -> str:
        """The accelerator to use: probes KVM once per process when KILN_ACCEL is
        auto (falling back to TCG) or kvm (failing with a BootError)."""
        global _accel_decision
        wanted = self.settings.accel
        if wanted == "tcg":
            return "tcg"
        if _accel_decision is None:
            if self._probe_lock is None:
                self._probe_lock = asyncio.Lock()
            async with self._probe_lock:
                if _accel_decision is None:
                    works, reason = await self._probe_kvm(image)
                    if not works and wanted == "kvm":
                        raise BootError(f"KILN_ACCEL=kvm but KVM cannot boot a guest here: {reason}")
                    _accel_decision = "kvm" if works else "tcg"
                    log.warning("accelerator: %s (%s)", _accel_decision, reason)
        if wanted == "kvm" and _accel_decision != "kvm":
            raise BootError("KILN_ACCEL=kvm but KVM failed its probe earlier in this process")
        return _accel_decision

    async def _probe_kvm(self, image: BootImage) -> tuple[bool, str]:
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            return False, "/dev/kvm is missing or not accessible"
        probe_id = f"kvm-probe-{uuid.uuid4().hex[:8]}"
        run_dir = self.settings.vms_dir / f".{probe_id}"
        spec = MachineSpec(vm_id=probe_id, vcpu_count=1, memory_mb=256, image=image, run_dir=run_dir)
        started = time.monotonic()
        try:
            machine = await self._launch(spec, "kvm")
            await machine.wait_ready(KVM_PROBE_SECONDS)
            return True, f"a KVM guest was ready in {time.monotonic() - started:.2f}s"
        except BootError as error:
            summary = " | ".join(line for line in str(error).splitlines() if line.strip())
            return False, f"KVM probe failed: {summary[-400:]}"
        finally:
            await self.destroy(probe_id, run_dir)

    # -- adopt, liveness, destroy

    async def adopt(self, vm_id: str, run_dir: Path) -> QemuMachine | None:
        paths = RunPaths(run_dir.resolve())
        pid = read_pid(paths.pid_file)
        if pid is None or not process_runs_in(pid, paths.root):
            return None
        try:
            description = json.loads(paths.machine_file.read_text())
        except (OSError, ValueError):
            log.warning("VM %s runs as pid %d but its machine.json is unreadable", vm_id, pid)
            return None
        machine = QemuMachine(
            vm_id=vm_id,
            pid=pid,
            run_dir=paths.root,
            accel=description["accel"],
            vcpu_count=description["vcpu_count"],
            memory_mb=description["memory_mb"],
            agent=AgentClient(paths.agent_socket, self.settings.agent_deadline_seconds),
            qmp=QmpConnection(paths.qmp_socket, f"qmp-{vm_id}"),
            memory_in_file=bool(description.get("memory_in_file", False)),
            owner=Owner(*description["owner"]) if description.get("owner") else None,
        )
        try:
            await machine.qmp.connect()
        except QemuError as error:
            # Another client holds QMP (QEMU serves one at a time) or QEMU is wedged.
            log.warning("VM %s runs as pid %d but cannot be adopted: %s", vm_id, pid, error)
            return None
        self._machines[vm_id] = machine
        return machine

    def is_running(self, machine: Machine) -> bool:
        return _qemu(machine).is_alive()

    async def destroy(self, vm_id: str, run_dir: Path) -> None:
        paths = RunPaths(run_dir.resolve())
        machine = self._machines.pop(vm_id, None)
        if machine is not None:
            await machine.close_connections()
            if machine.process is not None and machine.process.poll() is None:
                await signal_and_wait(machine.pid, STOP_GRACE_SECONDS)
                machine.process.wait()
        pid = read_pid(paths.pid_file)
        if pid is not None and process_runs_in(pid, paths.root):
            await signal_and_wait(pid, STOP_GRACE_SECONDS)
        elif pid is None:
            # No pid file (a crash between making the run dir and QEMU writing
            # it, or the dir is gone): find the process by its command line.
            for stray, run_dir in qemu_processes_under(paths.root.parent).items():
                if run_dir == paths.root:
                    await signal_and_wait(stray, STOP_GRACE_SECONDS)
        shutil.rmtree(paths.root, ignore_errors=True)

    # -- save (snapshots, suspend): kiln.runtime.qemu.saving

    async def save(self, machine: Machine, directory: Path, *, keep_running: bool = True) -> SavedState:
        return await saving.save(_qemu(machine), directory, keep_running=keep_running)

    def saved_state(self, directory: Path) -> SavedState:
        return saving.saved_state_from(directory, saving.read_saved_description(directory))

    async def recover_save(
        self, machine: Machine | None, run_dir: Path, directory: Path, *, keep_running: bool
    ) -> SaveRecovery:
        qmp = _qemu(machine).qmp if machine is not None else None
        return await saving.recover_save(run_dir, directory, qmp, keep_running=keep_running)

    async def flatten_saved_disk(self, directory: Path) -> None:
        await disks.flatten_saved_disk(directory)

    async def rebase_saved_disk(self, directory: Path, backing: Path) -> None:
        await disks.rebase_saved_disk(directory, backing)

    async def copy_saved(self, source: Path, target: Path) -> None:
        await disks.copy_saved(source, target)

    def disk_growth_left(self, machine: Machine) -> int:
        return disks.growth_left(RunPaths(machine.run_dir).top())

    async def grow_root_disk(self, machine: Machine, size_bytes: int) -> None:
        await disks.grow_root_disk(_qemu(machine).qmp, size_bytes)

    def cap_console(self, run_dir: Path) -> bool:
        return console.cap(RunPaths(run_dir.resolve()).console_log)

    def give_saved_state(self, directory: Path, uid: int, gid: int) -> None:
        saving.give_saved_state(directory, Owner(uid, gid))

    def console_tail(self, run_dir: Path, max_bytes: int) -> str:
        return log_tail(RunPaths(run_dir.resolve()).console_log, max_bytes, strip=False)

    def running_under(self, directory: Path) -> dict[int, Path]:
        """QEMU processes of VMs whose run dirs are directly under ``directory``."""
        return qemu_processes_under(directory)


def _qemu(machine: Machine) -> QemuMachine:
    """This driver's machines are its own; anything else is a caller's bug."""
    if not isinstance(machine, QemuMachine):
        raise TypeError(f"not a QEMU machine: {machine!r}")
    return machine
