"""The rules of mounting a volume, as pure functions (the create policy and
the mount service both use them): what a mount request may say, and which
mounts of a volume exclude each other.

- ``rw`` of the volume itself is exclusive: no other mount of the volume as it
  is now (rw or ro) may exist in any VM that holds its drives (running,
  suspended, being made or saved).
- ``ro`` of the volume itself is shared, while no ``rw`` one exists.
- A mount of a checkpoint (ro, or rw onto a throwaway layer) excludes nothing:
  the checkpoint never changes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from kiln.node.participant import Mount
from kiln.node.volumes import check_mount_path
from kiln.services.errors import FieldProblem, Location
from kiln.volumes import InvalidVolumeRequest

MOUNT_MODES = ("rw", "ro")


class MountRequest(Protocol):
    """A mount as a request asks for it (a create's ``volumes`` entry, or a hot attach)."""

    @property
    def volume_id(self) -> str: ...
    @property
    def mount_path(self) -> str: ...
    @property
    def mode(self) -> str: ...
    @property
    def checkpoint_id(self) -> str | None: ...


class MountLike(Protocol):
    vm_id: str
    volume_id: str
    mount_path: str
    mode: str
    checkpoint_id: str | None


def mount_problems(loc: Location, mount_path: str, mode: str) -> list[FieldProblem]:
    """422 problems of one mount request (``loc``: where it is in the body)."""
    problems = []
    try:
        check_mount_path(mount_path)
    except InvalidVolumeRequest as error:
        problems.append(FieldProblem((*loc, "mount_path"), str(error)))
    if mode not in MOUNT_MODES:
        problems.append(FieldProblem((*loc, "mode"), "must be 'rw' or 'ro'"))
    return problems


def as_mount(volume_id: str, mount_path: str, mode: str, checkpoint_id: str | None) -> Mount:
    return Mount(volume_id, mount_path, read_only=mode == "ro", checkpoint_id=checkpoint_id)


def conflict(mount: Mount, others: Iterable[MountLike]) -> str | None:
    """Why ``mount`` cannot be made next to ``others`` (the volume's mounts
    in VMs that hold its drives), or None."""
    if mount.checkpoint_id is not None:
        return None
    live = [other for other in others if other.checkpoint_id is None]
    if not mount.read_only and live:
        holder = live[0]
        return (
            f"volume {mount.volume_id} is mounted {holder.mode} in {holder.vm_id} at {holder.mount_path}; "
            "a rw mount needs it mounted nowhere else (mount it ro, or a checkpoint of it)"
        )
    writer = next((other for other in live if other.mode == "rw"), None)
    if mount.read_only and writer is not None:
        return (
            f"volume {mount.volume_id} is mounted rw in {writer.vm_id} at {writer.mount_path}; "
            "ro mounts are shared only while no rw mount exists"
        )
    return None
