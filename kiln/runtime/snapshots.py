"""Saved VMs on disk, hypervisor-neutral: base snapshots and file housekeeping.

A *base snapshot* is an image booted once (cold) and saved the moment its agent
answers. Restoring it is how VMs are made quickly: a new process loads the saved
memory and continues, instead of booting a kernel. A saved VM only restores with
the memory size and vCPU count it was saved with, so there is one base snapshot
per image build, shape and accelerator, cached under
``settings.cache_dir/base-snapshots/<key>/`` where the key names all of them
(the image part is a digest of the build's files, so a rebuilt image gets new
base snapshots and restarts or CI runs reuse the old ones while it is the same).

What is inside a saved directory belongs to the hypervisor driver (see the
"saved states" section of ``qemu.py``); this module only names, finds, sizes
and removes such directories.
"""

from __future__ import annotations

import asyncio
import base64
import fcntl
import hashlib
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from kiln.config import Settings
from kiln.runtime.driver import BootImage, Hypervisor, Machine, MachineSpec, SavedState
from kiln.runtime.errors import RuntimeFailure

log = logging.getLogger(__name__)

BASE_SNAPSHOTS_DIR_NAME = "base-snapshots"
# Where a base snapshot is made before it is renamed into place: a crash leaves
# only such directories, which the next build removes.
BUILD_DIR_PREFIX = ".build-"
BUILD_LOCK_NAME = "building.lock"
IDENTITY_SEED_BYTES = 64
# Part of every base snapshot's key. Bump it when what a driver adds to a cold
# boot changes what is saved (the kernel command line is in the saved memory):
# 2 = TCG guests boot with norandmaps (kiln.runtime.qemu.cmdline.TCG_GUEST_ARGUMENTS);
# 3 = every VM has a virtio-net card (kiln.runtime.qemu.cmdline.network_arguments).
BASE_SNAPSHOT_FORMAT = 3


@dataclass(frozen=True)
class Shape:
    """What a saved VM must be restored as."""

    memory_mb: int
    vcpu_count: int

    def __str__(self) -> str:
        return f"{self.memory_mb}MB/{self.vcpu_count}vcpu"


def image_digest(image: BootImage) -> str:
    """Names one build of an image: its files (path, size, mtime) and command line."""
    parts = [image.variant, image.cmdline]
    for path in (image.kernel, image.initrd, image.rootfs):
        resolved = Path(path).resolve()
        stat = resolved.stat()
        parts += [str(resolved), str(stat.st_size), str(stat.st_mtime_ns)]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def directory_size(directory: Path) -> int:
    """Bytes a saved directory takes on disk (files are sparse: blocks, not lengths)."""
    total = 0
    for path in directory.rglob("*"):
        if path.is_file():
            total += path.stat().st_blocks * 512
    return total


def remove_saved(directory: Path) -> None:
    """Remove a saved directory. Its files are read-only, its directory is not,
    so removing them needs no change of mode."""
    shutil.rmtree(directory, ignore_errors=True)


@dataclass(frozen=True)
class WarmUp:
    """What a variant's guest does once booted, before its base snapshot is saved
    (the browser variant starts Chromium: restored VMs have it already). ``tag``
    names it in the snapshot's key: a changed warm-up must change its tag."""

    tag: str
    run: Callable[[Machine], Awaitable[None]]


class Launcher(Protocol):
    """How a base-snapshot build starts and stops its VM: straight through the
    hypervisor (``DirectLauncher``), or through the node's pipeline so the
    build's QEMU is confined like every other."""

    async def start(self, spec: MachineSpec) -> Machine: ...

    async def stop(self, vm_id: str, run_dir: Path) -> None: ...


class DirectLauncher:
    def __init__(self, hypervisor: Hypervisor) -> None:
        self._hypervisor = hypervisor

    async def start(self, spec: MachineSpec) -> Machine:
        return await self._hypervisor.start(spec)

    async def stop(self, vm_id: str, run_dir: Path) -> None:
        await self._hypervisor.destroy(vm_id, run_dir)


class BaseSnapshots:
    """Finds and makes base snapshots; one build per key at a time in this process."""

    def __init__(
        self,
        settings: Settings,
        hypervisor: Hypervisor,
        launcher: Launcher | None = None,
        warm_ups: Mapping[str, WarmUp] | None = None,
    ) -> None:
        self._settings = settings
        self._hypervisor = hypervisor
        self._launcher = launcher or DirectLauncher(hypervisor)
        self._warm_ups = dict(warm_ups or {})
        self.root = settings.cache_dir / BASE_SNAPSHOTS_DIR_NAME
        self._build_locks: dict[str, asyncio.Lock] = {}

    def key(self, image: BootImage, shape: Shape) -> str | None:
        """The cache key; None while the accelerator is not decided yet
        (KILN_ACCEL=auto before the first boot: a snapshot made under TCG does
        not restore under KVM) or when the image's files cannot be read."""
        accel = self._hypervisor.accel
        if accel not in ("kvm", "tcg"):
            return None
        try:
            digest = image_digest(image)
        except OSError:
            return None  # the image's files are gone (or never were): nothing to boot
        shape_part = f"{shape.memory_mb}m-{shape.vcpu_count}c"
        # A warmed-up snapshot is another snapshot than a bare one of the same image.
        warm_up = self._warm_ups.get(image.variant)
        warmed = f"-{warm_up.tag}" if warm_up is not None else ""
        return f"{image.variant}-{digest}-{shape_part}-{accel}-f{BASE_SNAPSHOT_FORMAT}{warmed}"

    def shapes_cached(self, image: BootImage) -> int:
        """How many shapes of this image build have a base snapshot (or one being made)."""
        key = self.key(image, Shape(0, 0))
        if key is None or not self.root.is_dir():
            return 0
        build = key.split("-0m-0c-", 1)[0] + "-"
        return sum(1 for path in self.root.iterdir() if path.name.startswith(build))

    def find(self, image: BootImage, shape: Shape) -> SavedState | None:
        key = self.key(image, shape)
        if key is None or not (self.root / key).is_dir():
            return None
        try:
            return self._hypervisor.saved_state(self.root / key)
        except RuntimeFailure as error:
            log.warning("base snapshot %s is unusable (%s); it will be made again", key, error)
            return None

    async def ensure(self, image: BootImage, shape: Shape) -> SavedState:
        """The base snapshot of this image and shape, made now (a cold boot, some
        seconds under TCG) if it is not cached yet."""
        await self._hypervisor.decide_accel(image)  # part of the key
        found = self.find(image, shape)
        if found is not None:
            return found
        lock = self._build_locks.setdefault(f"{image.variant}/{shape}", asyncio.Lock())
        async with lock:
            found = self.find(image, shape)
            if found is not None:
                return found
            return await self._build(image, shape)

    def describe(self) -> list[dict]:
        """One row per cached base snapshot, for ``kiln images ls``."""
        rows: list[dict] = []
        if not self.root.is_dir():
            return rows
        for directory in sorted(self.root.iterdir()):
            if directory.name.startswith(BUILD_DIR_PREFIX) or not directory.is_dir():
                continue
            try:
                saved = self._hypervisor.saved_state(directory)
            except RuntimeFailure:
                continue
            rows.append(
                {
                    "key": directory.name,
                    "variant": directory.name.split("-", 1)[0],
                    "memory_mb": saved.memory_mb,
                    "vcpu_count": saved.vcpu_count,
                    "size": directory_size(directory),
                    "path": str(directory),
                    "created_at": directory.stat().st_mtime,
                }
            )
        return rows

    async def _build(self, image: BootImage, shape: Shape) -> SavedState:
        self.root.mkdir(parents=True, exist_ok=True)
        token = secrets.token_hex(4)
        work = self.root / f"{BUILD_DIR_PREFIX}{token}"
        vm_id = f"base-{token}"
        run_dir = work / "vm"
        started = time.monotonic()
        work.mkdir()
        # Held while this build lives: a build dir whose lock can be taken is a
        # dead process's leftover (see remove_unfinished_builds).
        build_lock = (work / BUILD_LOCK_NAME).open("w")
        fcntl.flock(build_lock, fcntl.LOCK_EX)
        try:
            machine = await self._launcher.start(
                MachineSpec(
                    vm_id=vm_id,
                    vcpu_count=shape.vcpu_count,
                    memory_mb=shape.memory_mb,
                    image=image,
                    run_dir=run_dir,
                    # The RAM file becomes the snapshot's memory, which VMs restored
                    # from it map copy-on-write: untouched pages stay shared.
                    memory_in_file=True,
                )
            )
            await machine.wait_ready(self._settings.boot_timeout_seconds)
            warm_up = self._warm_ups.get(image.variant)
            if warm_up is not None:
                await warm_up.run(machine)
            await self._hypervisor.save(machine, work / "saved", keep_running=False)
            # Known only now under KILN_ACCEL=auto: the boot decided the accelerator.
            key = self.key(image, shape)
            assert key is not None, "a VM ran, so the accelerator is decided"
            try:
                os.rename(work / "saved", self.root / key)
            except OSError:
                # Another process made the same snapshot meanwhile: use theirs.
                if not (self.root / key).is_dir():
                    raise
        finally:
            await self._launcher.stop(vm_id, run_dir)
            remove_saved(work)
            build_lock.close()
        log.info(
            "base snapshot %s made in %.1fs (cold boot and save)", key, time.monotonic() - started
        )
        return self._hypervisor.saved_state(self.root / key)

    async def remove_unfinished_builds(self) -> None:
        """Build directories (and their VMs) left by a process that died while
        building: those whose lock nobody holds any more."""
        if not self.root.is_dir():
            return
        for directory in self.root.glob(f"{BUILD_DIR_PREFIX}*"):
            try:
                with (directory / BUILD_LOCK_NAME).open("a") as lock:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    token = directory.name.removeprefix(BUILD_DIR_PREFIX)
                    log.info("removing the unfinished base snapshot build %s", directory.name)
                    await self._hypervisor.destroy(f"base-{token}", directory / "vm")
                    remove_saved(directory)
            except BlockingIOError:
                continue  # a live process is building it
            except FileNotFoundError:
                continue  # it finished (or was removed) meanwhile


async def reset_identity(machine: Machine, hostname: str) -> None:
    """Make a restored guest its own: fresh kernel entropy and random state, the
    host's time (the saved clock is stale), its own hostname. Two VMs restored
    from one snapshot must never share randomness, identity or time."""
    await machine.agent.call(
        "post_restore",
        seed=base64.b64encode(os.urandom(IDENTITY_SEED_BYTES)).decode(),
        time_ns=time.time_ns(),
        hostname=hostname,
    )
