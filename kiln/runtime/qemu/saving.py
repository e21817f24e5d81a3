"""Saving a VM (snapshots, suspend, base snapshots), restoring one, and finishing
or undoing a save that a crash of the server cut short.

A save pauses the guest, freezes its disk and streams its state into a file
QEMU gets as a file descriptor. Two kinds:

- **keep running** (user snapshots, clones): the VM goes on, on a new overlay on
  top of the frozen disk. Every step is ordered so that a ``kill -9`` of the
  server at any point leaves a state ``recover_save`` can tell apart:

  1. pause the guest (QEMU drains and flushes its disks);
  2. hard-link the VM's top layer (``overlay.<n>.qcow2``) into the save as
     ``disk.qcow2``: one file with two names; the VM still writes it, and
     deleting the save only removes a name;
  3. create ``overlay.<n+1>.qcow2`` on top of ``disk.qcow2``;
  4. switch the guest to it (``blockdev-add`` + ``blockdev-snapshot``): from
     here the VM needs ``disk.qcow2``, the save's disk, for as long as it lives;
  5. stream memory and devices to ``vmstate``, resume the guest, write
     ``state.json`` last.

  No file the VM has open is ever renamed: QEMU reopens a node by the name it
  opened it with (the switch reopens the old top read-only), and a renamed
  name would lead it to another file.

- **stop** (suspend, snapshot on terminate, base snapshots): stream the state,
  write ``state.pending`` (the stream is complete), stop QEMU, move the overlay
  (and a RAM file) into the save, rename ``state.pending`` to ``state.json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

from kiln.runtime.driver import MachineSpec, SavedState, SaveOutcome, SaveRecovery
from kiln.runtime.errors import BootError, RuntimeFailure, SaveError
from kiln.runtime.qemu import ownership
from kiln.runtime.qemu.disks import (
    create_overlay,
    move_file,
    root_disk,
    switch_to_overlay,
)
from kiln.runtime.qemu.machine import QemuMachine
from kiln.runtime.qemu.ownership import Owner
from kiln.runtime.qemu.paths import RunPaths, SavedPaths
from kiln.runtime.qemu.process import open_inodes, read_pid, signal_and_wait
from kiln.runtime.qemu.qmp import QemuError, QmpConnection

log = logging.getLogger(__name__)

SAVED_STATE_FORMAT = 1
STOP_GRACE_SECONDS = 2.0


# ---- descriptions


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
        disk_bytes=int(description.get("disk_size", 0)),
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


def _write_description(path: Path, description: dict) -> None:
    path.write_text(json.dumps(description, indent=2) + "\n")


def _make_read_only(paths: SavedPaths) -> None:
    """A finished save: the files of the user QEMU ran as (the disk's owner:
    QEMU wrote it), read-only but the RAM file (see ``ownership``)."""
    disk = paths.disk.stat()
    _give(paths, Owner(disk.st_uid, disk.st_gid))


def give_saved_state(directory: Path, owner: Owner) -> None:
    """A save made ``owner``'s, with a save's modes (a no-op when it is)."""
    paths = SavedPaths(directory)
    if paths.root.stat().st_uid != owner.uid or paths.disk.stat().st_uid != owner.uid:
        _give(paths, owner)


def _give(paths: SavedPaths, owner: Owner) -> None:
    ownership.give(paths.root, owner, ownership.SAVED_DIR_MODE)
    # Every file: the save's own and what lives beside them (an imported rootfs).
    for path in paths.root.iterdir():
        if path.is_file() and not path.is_symlink():
            mode = ownership.SAVED_MEMORY_MODE if path == paths.memory else ownership.SAVED_FILE_MODE
            ownership.give(path, owner, mode)


# ---- restore


async def create_overlay_on_saved_disk(saved: SavedState, overlay: Path) -> None:
    description = read_saved_description(saved.directory)
    await create_overlay(overlay, SavedPaths(saved.directory).disk, int(description["disk_size"]))


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


# ---- save


async def save(machine: QemuMachine, directory: Path, *, keep_running: bool) -> SavedState:
    saved = SavedPaths(directory.resolve())
    saved.root.mkdir(parents=True)
    started = time.monotonic()
    await machine.qmp.pause()
    try:
        disk_size = int((await root_disk(machine.qmp))["image"]["virtual-size"])
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
        if keep_running:
            await save_and_continue(machine, saved, disk_size)
            _write_description(saved.description, description)
        else:
            await save_and_stop(machine, saved, description)
    except BaseException:
        if keep_running or machine.is_alive():
            with contextlib.suppress(QemuError):
                await machine.qmp.resume()
        raise
    _make_read_only(saved)
    log.info(
        "VM %s saved to %s in %.3fs (%s)",
        machine.vm_id, saved.root, time.monotonic() - started,
        "running on" if keep_running else "stopped",
    )  # fmt: skip
    return saved_state_from(saved.root, description)


async def save_and_continue(machine: QemuMachine, saved: SavedPaths, disk_size: int) -> None:
    """Steps 2-5 of a save that keeps the VM running (the module docstring)."""
    paths = machine.paths
    layers = paths.layers()
    top = layers[-1]
    following = paths.layer(len(layers))
    try:
        os.link(top, saved.disk)
        await create_overlay(following, saved.disk, disk_size)
        ownership.give(following, machine.owner, ownership.DISK_MODE)
    except BaseException as error:
        following.unlink(missing_ok=True)
        shutil.rmtree(saved.root, ignore_errors=True)
        raise SaveError(f"cannot freeze the disk of VM {machine.vm_id}: {error}", disk_in_use=False) from error
    try:
        await switch_to_overlay(machine.qmp, following)
    except BaseException as error:
        # Whether QEMU took the new overlay is known only to QEMU: ask the
        # files it holds, as a restarted server would.
        if _holds(machine.pid, following):
            raise SaveError(f"cannot save VM {machine.vm_id}: {error}", disk_in_use=True) from error
        following.unlink(missing_ok=True)
        shutil.rmtree(saved.root, ignore_errors=True)
        raise SaveError(f"cannot freeze the disk of VM {machine.vm_id}: {error}", disk_in_use=False) from error
    try:
        await machine.qmp.prepare_migration(ignore_shared_memory=False)
        await machine.qmp.migrate_to_file(saved.vmstate)
    except BaseException as error:
        saved.vmstate.unlink(missing_ok=True)
        raise SaveError(f"cannot save VM {machine.vm_id}: {error}", disk_in_use=True) from error
    await machine.qmp.resume()


async def save_and_stop(machine: QemuMachine, saved: SavedPaths, description: dict) -> None:
    """Stream memory (none of it when it already is a file) and devices, stop
    QEMU, and move its overlay (and RAM file) into the save."""
    try:
        await machine.qmp.prepare_migration(ignore_shared_memory=machine.memory_in_file)
        await machine.qmp.migrate_to_file(saved.vmstate)
    except BaseException as error:
        shutil.rmtree(saved.root, ignore_errors=True)
        raise SaveError(f"cannot save VM {machine.vm_id}: {error}", disk_in_use=False) from error
    # From here the save is complete but for moving files: a restarted server
    # finishes it (recover_save) instead of undoing it.
    _write_description(saved.pending_description, description)
    await machine.close_connections()
    # SIGTERM: QEMU exits cleanly; the disk was flushed when the migration ended.
    await signal_and_wait(machine.pid, STOP_GRACE_SECONDS)
    if machine.process is not None:
        machine.process.wait()
    _finish_stopped_save(machine.paths, saved, memory_in_file=machine.memory_in_file)


def _finish_stopped_save(paths: RunPaths, saved: SavedPaths, *, memory_in_file: bool) -> None:
    # The newest layer is the disk: a stopping save makes none, so it is the
    # one QEMU wrote until it stopped.
    if not saved.disk.exists():
        move_file(paths.top(), saved.disk)
    if memory_in_file and paths.memory_file.exists():
        move_file(paths.memory_file, saved.memory)
    os.replace(saved.pending_description, saved.description)
    _make_read_only(saved)


def _holds(pid: int, path: Path) -> bool:
    """True if process ``pid`` has ``path``'s file open."""
    try:
        status = path.stat()
    except OSError:
        return False
    return (status.st_dev, status.st_ino) in open_inodes(pid)


# ---- after a crash


async def recover_save(
    run_dir: Path, directory: Path, qmp: QmpConnection | None, *, keep_running: bool
) -> SaveRecovery:
    """Settle a save into ``directory`` of the VM in ``run_dir`` that a server
    crash cut short, from what the files and the QEMU process (``qmp``: None if
    it is gone) show; the guest runs again if it still can."""
    paths, saved = RunPaths(run_dir.resolve()), SavedPaths(directory.resolve())
    pid = read_pid(paths.pid_file)
    if not keep_running:
        return await _recover_stopping_save(paths, saved, qmp)
    if saved.description.exists():
        # Finished, but not recorded: the VM runs on top of the save's disk.
        if qmp is not None:
            await _resume_guest(qmp)
        return SaveRecovery(SaveOutcome.COMPLETED, saved_state_from(saved.root, read_saved_description(saved.root)))
    outcome = SaveOutcome.UNDONE
    top = paths.top()
    if saved.disk.exists() and top.exists() and not os.path.samefile(saved.disk, top):
        # A layer newer than the frozen one exists (step 3): the save holds the
        # VM's disk only if QEMU switched to it (step 4).
        if pid is not None and _holds(pid, top):
            outcome = SaveOutcome.DISK_KEPT
        else:
            top.unlink()
    if outcome == SaveOutcome.DISK_KEPT:
        # The frozen disk stays; the unfinished memory stream does not.
        for leftover in (saved.vmstate, saved.description, saved.pending_description):
            leftover.unlink(missing_ok=True)
        with contextlib.suppress(FileNotFoundError):
            saved.disk.chmod(ownership.SAVED_FILE_MODE)
    else:
        shutil.rmtree(saved.root, ignore_errors=True)
    if qmp is not None:
        await _resume_guest(qmp)
    return SaveRecovery(outcome)


async def _recover_stopping_save(
    paths: RunPaths, saved: SavedPaths, qmp: QmpConnection | None
) -> SaveRecovery:
    if saved.description.exists():
        return SaveRecovery(SaveOutcome.COMPLETED, saved_state_from(saved.root, read_saved_description(saved.root)))
    if qmp is not None:
        # QEMU still runs: the guest goes on as it was; the save is undone.
        with contextlib.suppress(QemuError):
            await qmp.execute("migrate_cancel")
        shutil.rmtree(saved.root, ignore_errors=True)
        await _resume_guest(qmp)
        return SaveRecovery(SaveOutcome.UNDONE)
    if saved.pending_description.exists():
        description = json.loads(saved.pending_description.read_text())
        _finish_stopped_save(paths, saved, memory_in_file=description["memory"] == "file")
        return SaveRecovery(SaveOutcome.COMPLETED, saved_state_from(saved.root, description))
    shutil.rmtree(saved.root, ignore_errors=True)
    return SaveRecovery(SaveOutcome.LOST)


async def _resume_guest(qmp: QmpConnection) -> None:
    status = await qmp.status()
    if status in ("paused", "postmigrate", "finish-migrate"):
        await qmp.resume()
