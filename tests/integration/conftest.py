"""Shared fixtures for tests that boot real VMs.

- ``vm_settings``: Settings with a fresh, short data dir (unix socket paths are
  limited to 107 bytes); ``KILN_ACCEL`` and ``KILN_CACHE_DIR`` come from the environment.
- ``boot_image``: the built ``default`` image, built on first use (minutes, once per cache).
- ``hypervisor``: a ``QemuHypervisor`` for the test.
- ``start_vm``: starts VMs and destroys every one of them when the test ends.
- ``ready_vm``: one VM whose agent answers (restored from the base snapshot).
- ``base_snapshot``: the default image saved right after boot (cached with the image).
- ``restore_vm`` / ``restored_vm``: VMs restored from a saved state, identity reset,
  destroyed when the test ends: the fast way to get a VM (prefer it to a cold boot).
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

# The guest networking fixtures (net_fixtures.py), for every test here.
from net_fixtures import (  # noqa: F401
    egress_daemon,
    egress_settings,
    net_settings,
    net_vm,
    network,
    quiet_world,
    world,
)

from kiln.config import Settings
from kiln.runtime.driver import BootImage, MachineSpec, SavedState
from kiln.runtime.qemu import QEMU_BINARY, QemuHypervisor, QemuMachine
from kiln.runtime.snapshots import BaseSnapshots, Shape, reset_identity

StartVm = Callable[..., Awaitable[QemuMachine]]


@pytest.fixture(scope="session")
def vm_settings() -> Iterator[Settings]:
    data_dir = Path(tempfile.mkdtemp(prefix="kiln-it-"))
    try:
        yield Settings(data_dir=data_dir)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def boot_image(vm_settings: Settings) -> BootImage:
    if shutil.which(QEMU_BINARY) is None:
        pytest.skip(f"{QEMU_BINARY} is not installed")
    try:
        from kiln.runtime.images import ImageStore
    except ImportError as error:
        pytest.skip(f"kiln.runtime.images is not available: {error}")
    # Always built (a cache hit takes seconds): the cache is shared, and its
    # current image may have been built from another checkout's agent.
    return ImageStore(vm_settings).build("default")


@pytest.fixture
def hypervisor(vm_settings: Settings) -> QemuHypervisor:
    return QemuHypervisor(vm_settings)


@pytest.fixture
async def start_vm(
    hypervisor: QemuHypervisor, boot_image: BootImage, vm_settings: Settings
) -> AsyncIterator[StartVm]:
    """``await start_vm(vcpu_count=1, memory_mb=256, image=None, ready=True)``.

    Every VM started through it is destroyed at the end of the test, pass or fail."""
    started: list[str] = []

    async def start(
        *,
        vcpu_count: int = 1,
        memory_mb: int = 256,
        image: BootImage | None = None,
        ready: bool = True,
    ) -> QemuMachine:
        vm_id = f"t{uuid.uuid4().hex[:10]}"
        started.append(vm_id)
        machine = await hypervisor.start(
            MachineSpec(
                vm_id=vm_id,
                vcpu_count=vcpu_count,
                memory_mb=memory_mb,
                image=image or boot_image,
                run_dir=vm_settings.vms_dir / vm_id,
            )
        )
        if ready:
            await machine.wait_ready(vm_settings.boot_timeout_seconds)
        return machine

    try:
        yield start
    finally:
        for vm_id in started:
            await hypervisor.destroy(vm_id, vm_settings.vms_dir / vm_id)




# ---- restored VMs: how most tests should get a VM (well under a second, not a boot)

RestoreVm = Callable[..., Awaitable[QemuMachine]]
BASE_SHAPE = Shape(memory_mb=256, vcpu_count=1)  # start_vm's default shape


@pytest.fixture(scope="session")
def base_snapshot(vm_settings: Settings, boot_image: BootImage) -> SavedState:
    """The default image's base snapshot for 256 MB / 1 vCPU: cached with the image
    (``KILN_CACHE_DIR``), so only the first run on a host pays its cold boot."""

    async def ensure() -> SavedState:
        return await BaseSnapshots(vm_settings, QemuHypervisor(vm_settings)).ensure(
            boot_image, BASE_SHAPE
        )

    return asyncio.run(ensure())


@pytest.fixture
async def restore_vm(
    hypervisor: QemuHypervisor,
    boot_image: BootImage,
    base_snapshot: SavedState,
    vm_settings: Settings,
) -> AsyncIterator[RestoreVm]:
    """``await restore_vm(saved=None, identity=True)``: a VM restored from ``saved``
    (default: the base snapshot), its agent ready and, with ``identity``, its
    randomness, clock and hostname (its vm_id) reset as the VM service does.

    Every VM restored through it is destroyed at the end of the test."""
    started: list[str] = []

    async def restore(*, saved: SavedState | None = None, identity: bool = True) -> QemuMachine:
        saved = saved or base_snapshot
        vm_id = f"r{uuid.uuid4().hex[:10]}"
        started.append(vm_id)
        machine = await hypervisor.start(
            MachineSpec(
                vm_id=vm_id,
                vcpu_count=saved.vcpu_count,
                memory_mb=saved.memory_mb,
                image=boot_image,
                run_dir=vm_settings.vms_dir / vm_id,
                restore_from=saved,
            )
        )
        await machine.wait_ready(vm_settings.boot_timeout_seconds)
        if identity:
            await reset_identity(machine, vm_id)
        return machine

    try:
        yield restore
    finally:
        for vm_id in started:
            await hypervisor.destroy(vm_id, vm_settings.vms_dir / vm_id)


@pytest.fixture
async def restored_vm(restore_vm: RestoreVm) -> QemuMachine:
    """One VM restored from the base snapshot, ready, with its own identity."""
    return await restore_vm()


@pytest.fixture
async def ready_vm(restore_vm: RestoreVm) -> QemuMachine:
    """A VM whose agent answers: restored (well under a second), not booted;
    tests of booting itself use ``start_vm``."""
    return await restore_vm()
