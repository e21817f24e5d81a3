"""Snapshots of VMs with volumes mounted (user snapshots, clones, the snapshot
on terminate).

A save needs the VM's drives as they were at the save: the saved devices name
each drive at its SCSI target, and the saved guest's page cache and ext4 state
belong to exactly that content. So right before the save the guest is paused
and every volume it mounts gets a checkpoint named by the snapshot's id (the
drive of a rw mount moves onto a new top, as at any checkpoint); a checkpoint
mounted ro is its own record. The drives are written on the snapshot's row
(``mounts``) before the save starts, so a save a crash cut short keeps them.

A restore starts with placeholders of those drives (the kept content, writes
thrown away), and once the guest is up swaps each for the volume itself
(``kiln.volumes.Volumes.mount_all``): the new VM sees the volume as it is now,
which is what a volume is. A volume that is gone, or mounted rw elsewhere,
refuses the restore (409, ``VolumeMounts.plan``). Deleting the snapshot lets
its checkpoints go; their layers merge away once nothing has the volume.

A checkpoint mounted rw writes a throwaway layer that lives only as long as
its mount: a VM with one cannot be snapshotted (409).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from kiln.node.node import Node
from kiln.services.errors import Conflict
from kiln.volumes import VolumeBusy, VolumeError

log = logging.getLogger(__name__)

# Writes the drives on the snapshot's row.
Keep = Callable[[list[dict[str, Any]]], Awaitable[None]]


def check_capturable(node: Node, vm_id: str) -> None:
    """409 if a snapshot of the VM could not keep what its drives hold."""
    if node.volumes is None:
        return
    try:
        node.volumes.check_capturable(vm_id)
    except VolumeBusy as error:
        raise Conflict(str(error)) from error


async def pause_and_capture(
    node: Node, vm_id: str, snapshot_id: str, *, stopping: bool, keep: Keep
) -> list[dict[str, Any]]:
    """Right before the save into ``snapshot_id`` (the VM's save lock held):
    the drives as the snapshot's row keeps them, handed to ``keep`` while the
    guest is paused (empty: no volumes, and the guest was not paused). If
    ``keep`` fails, the guest continues. ``stopping``: the VM goes after the
    save; its rw mounts are flushed first."""
    if node.volumes is None:
        return []
    drives = await node.volumes.pause_and_capture(vm_id, snapshot_id, flush=stopping)
    mounts = [dataclasses.asdict(drive) for drive in drives]
    if mounts:
        try:
            await keep(mounts)
        except BaseException:
            await node.volumes.resume(vm_id)
            raise
    return mounts


async def forget(node: Node, snapshot_id: str, mounts: list[dict[str, Any]]) -> None:
    """The snapshot is gone (deleted, or its save failed): the checkpoints
    kept for it go too. Best effort: ``VolumeService.start`` removes any left."""
    if node.volumes is None:
        return
    for volume_id in sorted({d["volume_id"] for d in mounts if d["source_checkpoint_id"] == snapshot_id}):
        try:
            await node.volumes.volumes.delete_checkpoint(volume_id, snapshot_id)
        except VolumeError as error:
            log.info("snapshot %s: its checkpoint of volume %s stays for now: %s", snapshot_id, volume_id, error)
