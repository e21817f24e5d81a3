"""Fixtures of the volume tests: a ``Volumes`` on the session's data dir that
knows the test's VMs, helper VMs restored from the base snapshot, and the
removal of every volume a test made, pass or fail."""

from __future__ import annotations

import base64
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest

from kiln.config import Settings
from kiln.runtime.driver import BootImage, SavedState
from kiln.runtime.qemu import QemuHypervisor, QemuMachine
from kiln.volumes import HelperBase, HelperVms, Volumes

MiB = 1024 * 1024


@dataclass
class VolumeKit:
    volumes: Volumes
    helpers: HelperVms
    machines: dict[str, QemuMachine] = field(default_factory=dict)
    made: list[str] = field(default_factory=list)

    def know(self, machine: QemuMachine) -> QemuMachine:
        """Let ``Volumes`` reach this VM (as the node layer's registry would)."""
        self.machines[machine.vm_id] = machine
        return machine

    async def new_volume(self, size: int = 64 * MiB) -> str:
        volume_id = f"v{uuid.uuid4().hex[:10]}"
        self.made.append(volume_id)
        await self.volumes.create(volume_id, size)
        return volume_id


def require_host_tools() -> None:
    """Volumes need FUSE (raw views) and these programs; under CI a missing
    one fails the test instead of skipping it."""
    missing = [
        tool
        for tool in (
            "qemu-img",
            "qemu-storage-daemon",
            "mkfs.ext4",
            "e2fsck",
            "resize2fs",
            "dumpe2fs",
            "setpriv",
        )
        if shutil.which(tool) is None
    ]
    if not os.path.exists("/dev/fuse"):
        missing.append("/dev/fuse")
    if missing:
        message = f"volume tests need {', '.join(missing)}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(name="kit")
async def kit_fixture(
    vm_settings: Settings, boot_image: BootImage, base_snapshot: SavedState
) -> AsyncIterator[VolumeKit]:
    require_host_tools()
    hypervisor = QemuHypervisor(vm_settings)

    async def base() -> HelperBase:
        return HelperBase(boot_image, base_snapshot)

    helpers = HelperVms(vm_settings, hypervisor, base)
    machines: dict[str, QemuMachine] = {}
    volumes = Volumes(vm_settings, machines=machines.get, helpers=helpers)
    kit = VolumeKit(volumes, helpers, machines)
    try:
        yield kit
    finally:
        await helpers.close()
        for vm_id in list(helpers.active):
            await helpers.destroy(vm_id)
        for volume_id in kit.made:
            shutil.rmtree(vm_settings.volumes_dir / volume_id, ignore_errors=True)


async def run(
    machine: QemuMachine, command: str, timeout: float = 60
) -> tuple[int, str, str]:
    """``command`` in the guest's shell: exit code, stdout, stderr."""
    out = bytearray()
    err = bytearray()
    code = -1
    async for frame in machine.agent.stream("exec", shell=command, timeout=timeout):
        if frame["kind"] == "stdout":
            out += base64.b64decode(frame["data"])
        elif frame["kind"] == "stderr":
            err += base64.b64decode(frame["data"])
        elif frame["kind"] == "result":
            code = frame["value"]["exit_code"]
    return code, out.decode(errors="replace"), err.decode(errors="replace")


async def ok(machine: QemuMachine, command: str, timeout: float = 60) -> str:
    code, out, err = await run(machine, command, timeout)
    assert code == 0, f"{command!r} exited {code}: {err}"
    return out


Restore = Callable[..., object]
