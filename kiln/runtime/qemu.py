"""The QEMU ``microvm`` driver: one qemu-system-x86_64 process per VM, driven over QMP.

Everything QEMU-specific (command line, QMP, qemu-img) stays in this module, so
another hypervisor can be added behind ``kiln.runtime.driver.Hypervisor``.

Each VM owns a run dir (``settings.vms_dir/<vm_id>/``)::

    overlay.qcow2   the VM's writable disk, backed by the image's read-only rootfs
    agent.sock      QEMU's end of the virtio-serial port of the guest agent
    qmp.sock        QMP
    console.log     the guest's serial console (kept after a failure: it says why)
    qemu.log        QEMU's own stdout/stderr
    qemu.pid        written by QEMU
    machine.json    the spec the VM was started with, so a restarted server can adopt it

QEMU runs in its own process session, so it outlives a restart of the server,
which later finds it again with ``adopt``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from qemu.qmp import QMPClient, QMPError, Runstate

from kiln.config import Settings
from kiln.runtime.agent_client import AgentClient, AgentTimeout, AgentUnavailable
from kiln.runtime.driver import (
    BootError,
    BootImage,
    MachineSpec,
    Nic,
    RuntimeFailure,
    SavedState,
    SaveError,
    ScsiDrive,
)

log = logging.getLogger(__name__)

QEMU_BINARY = "qemu-system-x86_64"
QEMU_IMG = "qemu-img"

# TCG translation-block cache per VM. QEMU's default is 1 GiB, which a guest
# fills as it runs new code; 64 MiB bounds it (measured here: a 256 MB guest
# after boot and a few python starts, 275 MB RSS instead of 329 MB) at no
# measurable cost in boot or exec time.
TCG_TB_SIZE_MB = 64
# A KVM boot that has not reached a ready agent in this time is not going to:
# on hosts where KVM works, the probe VM is ready in well under a second.
KVM_PROBE_SECONDS = 6.0
# QEMU opens its QMP socket before the guest runs; this only waits for start-up.
QMP_READY_SECONDS = 15.0
QMP_CONNECT_ATTEMPT_SECONDS = 2.0
STOP_GRACE_SECONDS = 2.0
POLL_SECONDS = 0.05
# QEMU makes its QMP socket 65-130 ms after spawn; a restore waits for it, so
# look often (a 50 ms poll cost up to 50 ms per restore).
QMP_POLL_SECONDS = 0.005
# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107
LOG_TAIL_BYTES = 3000
# A save pauses the guest; poll its progress often so the pause stays short.
MIGRATION_POLL_SECONDS = 0.005
MIGRATION_BANDWIDTH = 1 << 40  # bytes/s: no limit, in effect


class QemuError(RuntimeFailure):
    """A QMP command failed or QMP could not be reached."""


@dataclass(frozen=True)
class RunPaths:
    """The files of one VM's run dir."""

    root: Path

    @property
    def overlay(self) -> Path:
        return self.root / "overlay.qcow2"

    @property
    def agent_socket(self) -> Path:
        return self.root / "agent.sock"

    @property
    def qmp_socket(self) -> Path:
        return self.root / "qmp.sock"

    @property
    def console_log(self) -> Path:
        return self.root / "console.log"

    @property
    def qemu_log(self) -> Path:
        return self.root / "qemu.log"

    @property
    def pid_file(self) -> Path:
        return self.root / "qemu.pid"

    @property
    def machine_file(self) -> Path:
        return self.root / "machine.json"

    @property
    def memory_file(self) -> Path:
        """Guest RAM, for a VM started with ``memory_in_file``."""
        return self.root / "memory.ram"

    def everything_but_the_console(self) -> list[Path]:
        return [
            self.memory_file,
            self.overlay,
            self.agent_socket,
            self.qmp_socket,
            self.qemu_log,
            self.pid_file,
            self.machine_file,
        ]


# ---- command line (pure)


# No address-space randomisation in a TCG guest. TCG keeps translated code per
# (physical page, virtual address); with ASLR every new process maps ld.so,
# libc and the program at new addresses, so all of it is translated again at
# every exec. Measured here (a restored 256 MB guest, agent exec, medians):
# bash -c 'echo ok' 91 -> 33 ms, /bin/true 37 -> 17 ms, python3 -S -c pass
# 166-184 -> 129-142 ms. The trade-off (see README.md): ASLR inside the guest
# is defence in depth for the guest's own processes; the isolation boundary
# between tenants is the VM, which this does not touch. KVM guests keep ASLR.
TCG_GUEST_ARGUMENTS = "norandmaps"


def tcg_kernel_arguments() -> str:
    """Kernel arguments a guest gets under TCG.

    TCG offers no way for the kernel to calibrate the TSC (no PIT/HPET reference
    on microvm), and the boot hangs without it; TCG's TSC is the host's, so the
    host's frequency is the right value. ``TCG_GUEST_ARGUMENTS``: why no ASLR."""
    return f"tsc_early_khz={host_cpu_khz()} {TCG_GUEST_ARGUMENTS}"


def host_cpu_khz() -> int:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return int(float(line.split(":", 1)[1]) * 1000)
    return 2_000_000


def accel_arguments(accel: str) -> list[str]:
    if accel == "kvm":
        return ["-accel", "kvm", "-cpu", "host"]
    if accel == "tcg":
        return ["-accel", f"tcg,tb-size={TCG_TB_SIZE_MB}", "-cpu", "max"]
    raise ValueError(f"unknown accelerator {accel!r}")


def kernel_command_line(image: BootImage, accel: str, tcg_arguments: str) -> str:
    """The image's command line; under TCG plus each TCG argument it does not set itself."""
    if accel != "tcg":
        return image.cmdline
    present = {word.split("=", 1)[0] for word in image.cmdline.split()}
    added = [word for word in tcg_arguments.split() if word.split("=", 1)[0] not in present]
    return " ".join([image.cmdline, *added]).strip()


# The NIC's backend when the VM has no network: a hub port with nothing else on
# the hub, so frames the guest sends go nowhere. The device itself is always
# there, because a saved VM restores only into the same set of devices.
UNWIRED_NETDEV = "hubport,id=net0,hubid=0"


def network_arguments(nic: Nic) -> list[str]:
    """The virtio-net card, on the TAP fd the host wired for it, or unwired."""
    netdev = f"tap,id=net0,fd={nic.tap_fd},vhost=off" if nic.tap_fd is not None else UNWIRED_NETDEV
    return ["-netdev", netdev, "-device", f"virtio-net-device,netdev=net0,mac={nic.mac}"]


def scsi_drive_arguments(drives: tuple[ScsiDrive, ...]) -> list[str]:
    """Volumes attached at start, on the virtio-scsi bus (JSON, so any path is safe)."""
    argv: list[str] = []
    for drive in drives:
        node = {
            "driver": drive.image_format,
            "node-name": drive.drive_id,
            "read-only": drive.read_only,
            "file": {"driver": "file", "filename": str(drive.path), "locking": "off"},
        }
        argv += ["-blockdev", json.dumps(node, separators=(",", ":"))]
        argv += [
            "-device",
            f"scsi-hd,bus=scsi0.0,drive={drive.drive_id},id={drive.drive_id},serial={drive.drive_id}",
        ]
    return argv


# Every VM's RAM is this one memory backend, whatever its kind: migration matches
# RAM blocks by name, so a VM saved with one kind restores into another.
GUEST_RAM_ID = "guest-ram"


def memory_arguments(spec: MachineSpec, paths: RunPaths) -> list[str]:
    """Guest RAM: anonymous; or a shared file in the run dir (``memory_in_file``),
    which a final save takes as the snapshot's memory; or, restoring a snapshot
    whose memory is a file, that file mapped privately (copy-on-write), so every
    page no VM has written stays shared in the host's page cache."""
    size = f"size={spec.memory_mb}M"
    saved = spec.restore_from
    if saved is not None and saved.memory_file is not None:
        backend = f"memory-backend-file,id={GUEST_RAM_ID},{size},mem-path={saved.memory_file},share=off"
    elif spec.memory_in_file:
        backend = f"memory-backend-file,id={GUEST_RAM_ID},{size},mem-path={paths.memory_file},share=on"
    else:
        backend = f"memory-backend-ram,id={GUEST_RAM_ID},{size}"
    return ["-object", backend, "-machine", f"memory-backend={GUEST_RAM_ID}"]


def incoming_arguments(spec: MachineSpec) -> list[str]:
    """A restore waits for ``migrate-incoming``, sent once its migration
    capabilities are set over QMP (they must match the saving side's)."""
    return ["-incoming", "defer"] if spec.restore_from is not None else []


def build_argv(
    spec: MachineSpec,
    accel: str,
    paths: RunPaths,
    *,
    binary: str = QEMU_BINARY,
    tcg_arguments: str = f"tsc_early_khz=2000000 {TCG_GUEST_ARGUMENTS}",
) -> list[str]:
    """The full QEMU command line of a cold boot. Paths are used as given: pass
    absolute ones, since adoption recognises the process by its run dir."""
    image = spec.image
    return [
        binary,
        "-name", f"kiln-{spec.vm_id}",
        "-M", "microvm,acpi=on",  # the Debian kernel finds virtio-mmio devices via ACPI only
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        *accel_arguments(accel),
        "-smp", str(spec.vcpu_count),
        "-m", str(spec.memory_mb),
        *memory_arguments(spec, paths),
        *incoming_arguments(spec),
        "-kernel", str(image.kernel),
        "-initrd", str(image.initrd),
        "-append", kernel_command_line(image, accel, tcg_arguments),
        # No file locking: see switch_to_overlay.
        "-drive", f"id=root,if=none,format=qcow2,file={paths.overlay},discard=unmap,file.locking=off",
        "-device", "virtio-blk-device,drive=root",
        "-chardev", f"socket,id=agent,path={paths.agent_socket},server=on,wait=off",
        "-device", "virtio-serial-device",
        "-device", "virtserialport,chardev=agent,name=kiln.agent",
        # Entropy from the host's RNG, so the guest's pool is ready early at boot.
        "-device", "virtio-rng-device",
        # Volumes are hot-plugged here later: microvm has no PCI hotplug.
        "-device", "virtio-scsi-device,id=scsi0",
        *network_arguments(spec.nic),
        *scsi_drive_arguments(spec.scsi_drives),
        "-chardev", f"socket,id=qmp,path={paths.qmp_socket},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        "-serial", f"file:{paths.console_log}",
        "-pidfile", str(paths.pid_file),
    ]  # fmt: skip


# ---- processes


def process_is_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie; reaps it if it is our child."""
    with contextlib.suppress(ChildProcessError):
        reaped, _ = os.waitpid(pid, os.WNOHANG)
        if reaped == pid:
            return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state letter follows the parenthesised command name, which may contain spaces.
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def process_runs_in(pid: int, run_dir: Path) -> bool:
    """True if ``pid`` is a live QEMU whose command line names ``run_dir`` (so a
    recycled pid is never mistaken for our VM)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    marker = str(run_dir).encode() + b"/"
    return (
        process_is_alive(pid)
        and bool(argv)
        and os.path.basename(argv[0]).startswith(b"qemu-system")
        and any(marker in part for part in argv)
    )


def read_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


def log_tail(path: Path, limit: int = LOG_TAIL_BYTES) -> str:
    try:
        with path.open("rb") as file:
            file.seek(0, os.SEEK_END)
            file.seek(max(0, file.tell() - limit))
            return file.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""


async def signal_and_wait(pid: int, grace: float) -> None:
    """SIGTERM the process group led by ``pid``, SIGKILL it after ``grace``, wait for exit."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            # QEMU leads its own session; the group also holds helpers such as a
            # migration's "exec:" shell.
            if os.getpgid(pid) == pid:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not process_is_alive(pid):
                return
            await asyncio.sleep(POLL_SECONDS)
    raise RuntimeFailure(f"QEMU process {pid} survived SIGKILL")


async def run_tool(*argv: str) -> str:
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
    )
    stdout, stderr = await process.communicate()
    if process.returncode != 0:
        raise RuntimeFailure(
            f"{shlex.join(argv)} failed ({process.returncode}): {stderr.decode(errors='replace').strip()}"
        )
    return stdout.decode()


async def disk_format(path: Path) -> str:
    info = json.loads(await run_tool(QEMU_IMG, "info", "--output=json", str(path)))
    return str(info["format"])


# ---- QMP


class QmpConnection:
    """One QMP session to a VM, reconnected on demand. QEMU serves one QMP client
    at a time, so there is one of these per VM in the server."""

    def __init__(self, socket_path: Path, name: str) -> None:
        self.socket_path = socket_path
        self._name = name
        self._client: QMPClient | None = None
        self._lock = asyncio.Lock()

    async def connect(self, timeout: float = QMP_CONNECT_ATTEMPT_SECONDS) -> None:
        async with self._lock:
            if self._client is not None and self._client.runstate == Runstate.RUNNING:
                return
            await self._drop()
            client = QMPClient(self._name)
            try:
                await asyncio.wait_for(client.connect(str(self.socket_path)), timeout)
            except (QMPError, OSError, TimeoutError) as error:
                with contextlib.suppress(Exception):
                    await client.disconnect()
                raise QemuError(f"cannot reach QMP at {self.socket_path}: {error!r}") from error
            self._client = client

    async def execute(self, command: str, timeout: float = 30.0, **arguments: object) -> object:
        await self.connect()
        assert self._client is not None
        try:
            return await asyncio.wait_for(self._client.execute(command, arguments or None), timeout)
        except (QMPError, OSError, TimeoutError) as error:
            raise QemuError(f"QMP {command} failed: {error}") from error

    async def close(self) -> None:
        async with self._lock:
            await self._drop()

    async def _drop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.disconnect()

    # Helpers for suspend and snapshots.

    async def status(self) -> str:
        """QEMU's run state: "running", "paused", "postmigrate", ..."""
        return str((await self.execute("query-status"))["status"])  # type: ignore[index]

    async def pause(self) -> None:
        await self.execute("stop")

    async def resume(self) -> None:
        await self.execute("cont")

    async def migrate_to_file(self, path: Path, timeout: float = 300.0) -> None:
        """Save the (preferably paused) VM's memory and device state to ``path``."""
        await self.execute("migrate", uri=f"exec:cat > {shlex.quote(str(path))}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = await self.execute("query-migrate")
            status = info.get("status") if isinstance(info, dict) else None
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                raise QemuError(f"migration to {path} {status}: {info.get('error-desc', '')}")
            await asyncio.sleep(MIGRATION_POLL_SECONDS)
        await self.execute("migrate_cancel")
        raise QemuError(f"migration to {path} did not finish within {timeout:g}s")

    async def prepare_migration(self, *, ignore_shared_memory: bool) -> None:
        """Set what a save and its restore must agree on.

        ``x-ignore-shared`` leaves RAM in a shared memory-backend-file out of the
        stream (the file is the memory); both ends must set it alike. The
        bandwidth limit (32 MiB/s by default) is for live migration over a
        network; a save to a local file wants none."""
        await self.execute(
            "migrate-set-capabilities",
            capabilities=[{"capability": "x-ignore-shared", "state": ignore_shared_memory}],
        )
        await self.execute("migrate-set-parameters", **{"max-bandwidth": MIGRATION_BANDWIDTH})

    async def migrate_from_file(self, path: Path, timeout: float = 120.0) -> None:
        """Load the state saved in ``path`` into a QEMU started with ``-incoming
        defer``; returns once the guest runs."""
        await self.execute("migrate-incoming", uri=f"exec:cat {shlex.quote(str(path))}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = await self.status()
            if status == "running":
                return
            if status == "paused":
                # Saved while paused (as every save is): QEMU keeps it so.
                await self.resume()
                return
            if status not in ("inmigrate", "prelaunch"):
                raise QemuError(f"loading {path} ended with the VM {status}")
            await asyncio.sleep(MIGRATION_POLL_SECONDS)
        raise QemuError(f"loading {path} did not finish within {timeout:g}s")


# ---- saved states (snapshots, suspended VMs)
#
# A save's directory holds, all read-only once written:
#
#     state.json    what a restore must match (shape, accelerator) and where things are
#     vmstate       QEMU's migration stream: device state, plus the guest RAM
#                   unless the RAM is memory.ram
#     memory.ram    the guest RAM as a flat file (saves of VMs started with memory_in_file)
#     disk.qcow2    the frozen disk; its backing file is the image's rootfs or an
#                   earlier save's disk
#
# Saving pauses the guest, freezes the disk, streams the state to a file with
# QEMU's ``migrate`` to ``exec:cat > file`` (QEMU 7.2 has no ``file:`` URI), and
# then either resumes the guest on a new overlay or stops QEMU. Restoring starts
# QEMU with ``-incoming defer`` over a new overlay on the frozen disk and loads
# the stream with ``migrate-incoming``; QEMU starts the guest when it is loaded.

SAVED_STATE_FORMAT = 1
READ_ONLY_FILE_MODE = 0o444


@dataclass(frozen=True)
class SavedPaths:
    """The files of one save's directory."""

    root: Path

    @property
    def description(self) -> Path:
        return self.root / "state.json"

    @property
    def vmstate(self) -> Path:
        return self.root / "vmstate"

    @property
    def memory(self) -> Path:
        return self.root / "memory.ram"

    @property
    def disk(self) -> Path:
        return self.root / "disk.qcow2"


def read_saved_description(directory: Path) -> dict:
    try:
        description = json.loads(SavedPaths(directory).description.read_text())
    except (OSError, ValueError) as error:
        raise RuntimeFailure(f"no saved VM state in {directory}: {error}") from error
    if description.get("format") != SAVED_STATE_FORMAT:
        raise RuntimeFailure(f"{directory} holds a saved state of another format")
    return description


def saved_state_from(directory: Path, description: dict) -> SavedState:
    paths = SavedPaths(directory)
    return SavedState(
        directory=directory,
        memory_mb=description["memory_mb"],
        vcpu_count=description["vcpu_count"],
        memory_file=paths.memory if description["memory"] == "file" else None,
        disk=paths.disk,
    )


def check_restorable(spec: MachineSpec, accel: str, description: dict) -> None:
    """A saved VM continues only on the machine it was saved from: same memory
    size, vCPUs and accelerator (the CPU model differs between TCG and KVM)."""
    mismatches = [
        f"{name} {description[name]} (asked: {wanted})"
        for name, wanted in (
            ("memory_mb", spec.memory_mb),
            ("vcpu_count", spec.vcpu_count),
            ("accel", accel),
        )
        if description[name] != wanted
    ]
    if mismatches:
        raise BootError(f"the saved VM cannot be restored as asked: it was saved with {', '.join(mismatches)}")


async def create_overlay_on_saved_disk(saved: SavedState, overlay: Path) -> None:
    description = read_saved_description(saved.directory)
    disk = SavedPaths(saved.directory).disk
    await create_overlay(overlay, disk, int(description["disk_size"]))


async def create_overlay(overlay: Path, backing: Path, size: int) -> None:
    """A qcow2 overlay on a qcow2 disk. ``-u`` with the size given: qemu-img
    need not open the backing file, which a running QEMU may hold locked."""
    overlay.unlink(missing_ok=True)
    await run_tool(
        QEMU_IMG, "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(backing), "-u",
        str(overlay), str(size),
    )  # fmt: skip


async def load_saved_state(machine: QemuMachine, saved: SavedState) -> None:
    await machine.qmp.prepare_migration(ignore_shared_memory=saved.memory_file is not None)
    loading = asyncio.create_task(machine.qmp.migrate_from_file(SavedPaths(saved.directory).vmstate))
    try:
        # QEMU exits when a load fails; notice that instead of waiting out the timeout.
        while not loading.done():
            await asyncio.wait({loading}, timeout=0.1)
            if not loading.done() and not machine.is_alive():
                raise BootError(f"QEMU exited while loading {saved.directory}\n{machine.failure_output()}")
        loading.result()
    except QemuError as error:
        raise BootError(f"cannot load {saved.directory}: {error}\n{machine.failure_output()}") from error
    finally:
        if not loading.done():
            loading.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await loading


async def switch_to_overlay(qmp: QmpConnection, overlay: Path) -> None:
    """Put ``overlay`` (whose backing file is the current top's file) on top of
    the root disk's chain; the old top becomes its read-only backing node.

    File locking is off on every node a VM writes through (see ``build_argv``):
    QEMU 7.2 fails to take back the write lock of a former top node when a
    migration hands the disks back (``cont`` says 'Failed to get "write" lock').
    Nothing else ever opens a VM's overlay, so the lock protects nothing here."""
    top = await root_disk_node(qmp)
    node = f"overlay-{uuid.uuid4().hex[:12]}"
    await qmp.execute(
        "blockdev-add",
        **{
            "driver": "qcow2",
            "node-name": node,
            "file": {"driver": "file", "filename": str(overlay), "locking": "off"},
            "discard": "unmap",
            "backing": None,
        },
    )
    await qmp.execute("blockdev-snapshot", node=top, overlay=node)


async def root_disk(qmp: QmpConnection) -> dict:
    """``query-block``'s description of the VM's root disk as it is now."""
    for block in await qmp.execute("query-block"):  # type: ignore[union-attr]
        if block.get("device") == "root" and "inserted" in block:
            return dict(block["inserted"])
    raise QemuError("the VM has no root disk")


async def root_disk_node(qmp: QmpConnection) -> str:
    return str((await root_disk(qmp))["node-name"])


def make_read_only(paths: SavedPaths) -> None:
    for path in (paths.vmstate, paths.memory, paths.disk, paths.description):
        with contextlib.suppress(FileNotFoundError):
            path.chmod(READ_ONLY_FILE_MODE)


def move_file(source: Path, target: Path) -> None:
    """Rename, or copy (keeping holes) when the two are on different file systems."""
    try:
        os.replace(source, target)
    except OSError as error:
        if error.errno != errno.EXDEV:
            raise
        subprocess.run(["cp", "--sparse=always", str(source), str(target)], check=True)
        source.unlink()


# ---- machines


@dataclass(eq=False)
class QemuMachine:
    """A running QEMU process of one VM. Use it from one event loop."""

    vm_id: str
    pid: int
    run_dir: Path
    accel: str
    vcpu_count: int
    memory_mb: int
    agent: AgentClient
    qmp: QmpConnection
    # Set when this server started the process (then it is our child to reap).
    process: subprocess.Popen | None = field(default=None, repr=False)
    # Guest RAM is the shared file ``paths.memory_file`` (see ``memory_arguments``).
    memory_in_file: bool = False

    @property
    def paths(self) -> RunPaths:
        return RunPaths(self.run_dir)

    def is_alive(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        return process_runs_in(self.pid, self.run_dir)

    def failure_output(self) -> str:
        """What QEMU and the guest console said last: the reason of a failed boot."""
        parts = []
        if qemu := log_tail(self.paths.qemu_log):
            parts.append(f"QEMU output: {qemu}")
        if console := log_tail(self.paths.console_log):
            parts.append(f"guest console (tail): {console}")
        return "\n".join(parts) or "no output"

    async def wait_ready(self, timeout: float) -> dict:
        """Wait for the guest agent, failing fast with the console's last words
        if QEMU exits meanwhile. Returns the agent's ping value."""
        ready = asyncio.create_task(self.agent.wait_ready(timeout))
        try:
            while True:
                done, _ = await asyncio.wait({ready}, timeout=0.1)
                if done:
                    return ready.result()
                if not self.is_alive():
                    raise BootError(f"QEMU exited while the guest booted\n{self.failure_output()}")
        except (AgentUnavailable, AgentTimeout) as error:
            raise BootError(f"{error}\n{self.failure_output()}") from error
        finally:
            if not ready.done():
                ready.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await ready

    async def close_connections(self) -> None:
        """Drop the agent and QMP connections; the VM keeps running."""
        await self.agent.close()
        await self.qmp.close()


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
            check_restorable(spec, accel, read_saved_description(spec.restore_from.directory))
        return await self._launch(spec, accel)

    async def _launch(self, spec: MachineSpec, accel: str) -> QemuMachine:
        paths = RunPaths(spec.run_dir.resolve())
        self._check_can_start(spec, paths)
        paths.root.mkdir(parents=True, exist_ok=True)
        process: subprocess.Popen | None = None
        machine: QemuMachine | None = None
        try:
            if spec.restore_from is not None:
                await create_overlay_on_saved_disk(spec.restore_from, paths.overlay)
            else:
                await self._create_overlay(spec.image, paths)
            self._write_machine_file(spec, accel, paths)
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
                )
            machine = QemuMachine(
                vm_id=spec.vm_id,
                pid=process.pid,
                run_dir=paths.root,
                accel=accel,
                vcpu_count=spec.vcpu_count,
                memory_mb=spec.memory_mb,
                agent=AgentClient(paths.agent_socket),
                qmp=QmpConnection(paths.qmp_socket, f"qmp-{spec.vm_id}"),
                process=process,
                memory_in_file=spec.memory_in_file,
            )
            await self._wait_for_qmp(machine)
            if spec.restore_from is not None:
                await load_saved_state(machine, spec.restore_from)
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

    async def _create_overlay(self, image: BootImage, paths: RunPaths) -> None:
        base = Path(image.rootfs).resolve()
        base_format = await disk_format(base)
        paths.overlay.unlink(missing_ok=True)
        await run_tool(
            QEMU_IMG, "create", "-q", "-f", "qcow2", "-F", base_format, "-b", str(base), str(paths.overlay)
        )

    def _write_machine_file(self, spec: MachineSpec, accel: str, paths: RunPaths) -> None:
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
            agent=AgentClient(paths.agent_socket),
            qmp=QmpConnection(paths.qmp_socket, f"qmp-{vm_id}"),
            memory_in_file=bool(description.get("memory_in_file", False)),
        )
        try:
            await machine.qmp.connect()
        except QemuError as error:
            # Another client holds QMP (QEMU serves one at a time) or QEMU is wedged.
            log.warning("VM %s runs as pid %d but cannot be adopted: %s", vm_id, pid, error)
            return None
        self._machines[vm_id] = machine
        return machine

    def is_running(self, machine: QemuMachine) -> bool:  # type: ignore[override]
        return machine.is_alive()

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
        shutil.rmtree(paths.root, ignore_errors=True)

    # -- save (snapshots, suspend)

    async def save(
        self, machine: QemuMachine, directory: Path, *, keep_running: bool = True
    ) -> SavedState:  # type: ignore[override]
        saved = SavedPaths(directory.resolve())
        saved.root.mkdir(parents=True)
        started = time.monotonic()
        await machine.qmp.pause()
        try:
            disk_size = int((await root_disk(machine.qmp))["image"]["virtual-size"])
            if keep_running:
                await self._save_and_continue(machine, saved, disk_size)
            else:
                await self._save_and_stop(machine, saved)
        except BaseException:
            if keep_running or machine.is_alive():
                with contextlib.suppress(QemuError):
                    await machine.qmp.resume()
            raise
        memory_in_file = machine.memory_in_file and not keep_running
        description = {
            "format": SAVED_STATE_FORMAT,
            "vm_id": machine.vm_id,
            "memory_mb": machine.memory_mb,
            "vcpu_count": machine.vcpu_count,
            "accel": machine.accel,
            "memory": "file" if memory_in_file else "stream",
            "disk_size": disk_size,
            "saved_at": time.time(),
        }
        saved.description.write_text(json.dumps(description, indent=2) + "\n")
        make_read_only(saved)
        log.info(
            "VM %s saved to %s in %.3fs (%s)",
            machine.vm_id, saved.root, time.monotonic() - started,
            "running on" if keep_running else "stopped",
        )  # fmt: skip
        return saved_state_from(saved.root, description)

    def saved_state(self, directory: Path) -> SavedState:
        return saved_state_from(directory, read_saved_description(directory))

    async def _save_and_continue(self, machine: QemuMachine, saved: SavedPaths, disk_size: int) -> None:
        """Freeze the disk by making the current overlay the save's disk and
        switching the paused guest to a new, empty overlay on top of it (constant
        time, whatever the disk holds); then stream memory and devices."""
        overlay = machine.paths.overlay
        # QEMU keeps writing through its open file, so the rename is invisible to it.
        os.replace(overlay, saved.disk)
        try:
            await create_overlay(overlay, saved.disk, disk_size)
            await switch_to_overlay(machine.qmp, overlay)
        except BaseException as error:
            overlay.unlink(missing_ok=True)
            os.replace(saved.disk, overlay)
            shutil.rmtree(saved.root, ignore_errors=True)
            raise SaveError(f"cannot freeze the disk of VM {machine.vm_id}: {error}", disk_in_use=False) from error
        try:
            await machine.qmp.prepare_migration(ignore_shared_memory=False)
            await machine.qmp.migrate_to_file(saved.vmstate)
        except BaseException as error:
            saved.vmstate.unlink(missing_ok=True)
            raise SaveError(f"cannot save VM {machine.vm_id}: {error}", disk_in_use=True) from error
        await machine.qmp.resume()

    async def _save_and_stop(self, machine: QemuMachine, saved: SavedPaths) -> None:
        """Stream memory (none of it when it already is a file) and devices, stop
        QEMU, and move its overlay (and RAM file) into the save."""
        try:
            await machine.qmp.prepare_migration(ignore_shared_memory=machine.memory_in_file)
            await machine.qmp.migrate_to_file(saved.vmstate)
        except BaseException as error:
            shutil.rmtree(saved.root, ignore_errors=True)
            raise SaveError(f"cannot save VM {machine.vm_id}: {error}", disk_in_use=False) from error
        await machine.close_connections()
        # SIGTERM: QEMU exits cleanly; the disk was flushed when the migration ended.
        await signal_and_wait(machine.pid, STOP_GRACE_SECONDS)
        if machine.process is not None:
            machine.process.wait()
        move_file(machine.paths.overlay, saved.disk)
        if machine.memory_in_file:
            move_file(machine.paths.memory_file, saved.memory)

    async def flatten_saved_disk(self, directory: Path) -> None:
        disk = SavedPaths(directory).disk
        # -U: VMs may have the chain open; nothing writes to a saved disk.
        chain = json.loads(
            await run_tool(QEMU_IMG, "info", "-U", "--backing-chain", "--output=json", str(disk))
        )
        if len(chain) <= 2:
            return  # already on the image itself
        image = chain[-1]
        flat = disk.with_name(f".{disk.name}.flat")
        try:
            await run_tool(
                QEMU_IMG, "convert", "-U", "-O", "qcow2", "-B", image["filename"],
                "-F", image["format"], str(disk), str(flat),
            )  # fmt: skip
            flat.chmod(READ_ONLY_FILE_MODE)
            os.replace(flat, disk)
        finally:
            flat.unlink(missing_ok=True)
        log.info("flattened %s (%d layers) onto %s", disk, len(chain) - 1, image["filename"])

    async def rebase_saved_disk(self, directory: Path, backing: Path) -> None:
        disk = SavedPaths(directory).disk
        backing = backing.resolve()
        backing_format = await disk_format(backing)
        disk.chmod(0o644)
        try:
            # -u: only the header changes; the content is the same file's, moved.
            await run_tool(
                QEMU_IMG, "rebase", "-u", "-f", "qcow2", "-F", backing_format, "-b", str(backing), str(disk)
            )  # fmt: skip
        finally:
            disk.chmod(READ_ONLY_FILE_MODE)
