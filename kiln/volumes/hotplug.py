"""Drives on a running VM's virtio-scsi bus, over QMP.

microvm has no PCI hotplug, but its one virtio-scsi controller (``scsi0``)
takes ``scsi-hd`` devices at any time: a drive is a block node
(``blockdev-add``) plus a device on the bus (``device_add``), and goes away in
the reverse order (``device_del``, which completes when the device is
unrealized, then ``blockdev-del``). Node names, device ids and the serial the
guest sees are all the drive id.

A drive's device sits at an explicit SCSI target (``scsi-id``): a saved VM's
device state is keyed by that address (``0:<scsi-id>:0/scsi-disk``), so a
restore must put every drive back where it was.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from kiln.runtime.errors import RuntimeFailure
from kiln.volumes.errors import VolumeError

SCSI_BUS = "scsi0.0"
MAX_SCSI_ID = 255
UNPLUG_SECONDS = 10.0
POLL_SECONDS = 0.01


class Qmp(Protocol):
    """What this package needs of a VM's QMP connection (``QemuMachine.qmp``)."""

    async def execute(
        self, command: str, timeout: float = 30.0, **arguments: object
    ) -> object: ...


async def execute(qmp: Qmp, command: str, **arguments: Any) -> Any:
    """One QMP command; QMP answers are JSON, typed ``Any`` here and nowhere else."""
    return await qmp.execute(command, **arguments)


@dataclass(frozen=True)
class DriveState:
    drive_id: str
    node: str  # the device's top node now (an online checkpoint puts a new one on top)
    file: str  # the file that node writes to
    read_only: bool


async def drives(qmp: Qmp) -> dict[str, DriveState]:
    """The named drives of the VM now, by device id."""
    found: dict[str, DriveState] = {}
    for block in await execute(qmp, "query-block"):
        device = block.get("qdev", "")
        inserted = block.get("inserted")
        if not device or device.startswith("/") or not inserted:
            continue
        found[device] = DriveState(
            device,
            str(inserted["node-name"]),
            str(inserted["file"]),
            bool(inserted["ro"]),
        )
    return found


async def scsi_ids_in_use(qmp: Qmp) -> set[int]:
    """The SCSI targets of the VM's named drives (a failed QMP call is a
    ``RuntimeFailure``: here, a device without a ``scsi-id``)."""
    used: set[int] = set()
    for drive_id in await drives(qmp):
        try:
            value = await execute(
                qmp,
                "qom-get",
                path=f"/machine/peripheral/{drive_id}",
                property="scsi-id",
            )
        except RuntimeFailure:
            continue
        used.add(int(value))
    return used


def node_definition(node_name: str, image: Path, read_only: bool) -> dict[str, object]:
    """The qcow2 node of a drive. No file locking, as on the VM's root disk
    (``kiln.runtime.qemu.switch_to_overlay``: QEMU 7.2 fails to take back a
    write lock after a migration hands the disks back); this package's
    attachment records are what keeps two writers off one volume."""
    return {
        "driver": "qcow2",
        "node-name": node_name,
        "read-only": read_only,
        "file": {"driver": "file", "filename": str(image), "locking": "off"},
    }


async def add_drive(
    qmp: Qmp, drive_id: str, image: Path, *, read_only: bool, scsi_id: int
) -> None:
    """Plug ``image`` in as a SCSI disk whose serial is ``drive_id``."""
    await execute(qmp, "blockdev-add", **node_definition(drive_id, image, read_only))
    try:
        await execute(
            qmp,
            "device_add",
            driver="scsi-hd",
            bus=SCSI_BUS,
            drive=drive_id,
            id=drive_id,
            serial=drive_id,
            **{"scsi-id": scsi_id, "lun": 0},
        )
    except BaseException:
        await delete_nodes(qmp, drive_id)
        raise


async def remove_drive(
    qmp: Qmp, drive_id: str, timeout: float = UNPLUG_SECONDS
) -> None:
    """Unplug the device (if there) and delete its nodes. The guest should
    have let go of the disk first (``umount`` with the serial)."""
    if drive_id in await drives(qmp):
        try:
            await execute(qmp, "device_del", id=drive_id)
        except RuntimeFailure as error:
            if "not found" not in str(error):
                raise
        deadline = time.monotonic() + timeout
        # QEMU reports DEVICE_DELETED once the device is unrealized; its drive
        # leaves query-block at the same moment, which is what this waits for.
        while drive_id in await drives(qmp):
            if time.monotonic() > deadline:
                raise VolumeError(
                    f"the VM did not release drive {drive_id} within {timeout:g}s"
                )
            await asyncio.sleep(POLL_SECONDS)
    await delete_nodes(qmp, drive_id)


def is_drive_node(name: str, drive_id: str) -> bool:
    return name == drive_id or name.startswith(f"{drive_id}-")


async def delete_nodes(qmp: Qmp, drive_id: str) -> None:
    """Delete every node this package added for the drive, tops first (a
    node that still backs another is "in use" until its top is gone)."""
    while True:
        names = [
            str(node["node-name"])
            for node in await execute(qmp, "query-named-block-nodes")
            if is_drive_node(str(node.get("node-name", "")), drive_id)
        ]
        if not names:
            return
        progress = False
        last_error: BaseException | None = None
        for name in sorted(
            set(names), reverse=True
        ):  # "<id>-o2" before "<id>-o1" before "<id>"
            try:
                await execute(qmp, "blockdev-del", **{"node-name": name})
                progress = True
            except RuntimeFailure as error:
                last_error = error
        if not progress:
            raise VolumeError(
                f"cannot delete the block nodes of drive {drive_id}: {last_error}"
            )


async def snapshot_drive(qmp: Qmp, drive_id: str, overlay: Path) -> str:
    """Put ``overlay`` (a new qcow2 whose header already names the drive's
    current file as its backing) on top of the drive: from now on the guest
    writes into it and the old top is read-only. Returns the new node's name."""
    state = (await drives(qmp)).get(drive_id)
    if state is None:
        raise VolumeError(f"the VM has no drive {drive_id}")
    existing = {
        str(node.get("node-name", ""))
        for node in await execute(qmp, "query-named-block-nodes")
    }
    number = 1
    while f"{drive_id}-o{number:03d}" in existing:
        number += 1
    node = f"{drive_id}-o{number:03d}"
    await execute(
        qmp,
        "blockdev-add",
        **{**node_definition(node, overlay, False), "backing": None},
    )
    try:
        await execute(qmp, "blockdev-snapshot", node=state.node, overlay=node)
    except BaseException:
        await execute(qmp, "blockdev-del", **{"node-name": node})
        raise
    return node


async def pause(qmp: Qmp) -> None:
    await execute(qmp, "stop")


async def resume(qmp: Qmp) -> None:
    await execute(qmp, "cont")


async def resize_drive(qmp: Qmp, drive_id: str, size_bytes: int) -> None:
    state = (await drives(qmp)).get(drive_id)
    if state is None:
        raise VolumeError(f"the VM has no drive {drive_id}")
    await execute(qmp, "block_resize", **{"node-name": state.node, "size": size_bytes})


def free_scsi_id(used: set[int]) -> int:
    for scsi_id in range(MAX_SCSI_ID + 1):
        if scsi_id not in used:
            return scsi_id
    raise VolumeError(f"the VM has {MAX_SCSI_ID + 1} SCSI disks already")
