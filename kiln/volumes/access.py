"""``VolumeAccess``: what every operation of ``Volumes`` starts from. The
volume's lock, taken with anything a dead process left half done finished or
undone first, and which running VM (if any) reaches the volume now: through
its QMP and agent an operation runs in that VM instead of on the image.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable

from kiln.config import Settings
from kiln.volumes import chain, procfs
from kiln.volumes.attach import GuestFactory, VmHandle, as_handle
from kiln.volumes.attachments import Attachment, AttachmentStore
from kiln.volumes.errors import VolumeBusy, VolumeNotFound
from kiln.volumes.guest import guest_volumes
from kiln.volumes.helper import HelperVms
from kiln.volumes.layout import FileOwner, VolumeMeta, VolumePaths, open_to_vms, read_meta, volume_paths
from kiln.volumes.locks import VolumeLocks
from kiln.volumes.rawview import remove_stale_views
from kiln.volumes.tools import Identity

# vm_id -> the running VM, if this host runs it (the node layer's registry).
MachineLookup = Callable[[str], object | None]


def machine_is_alive(machine: object) -> bool:
    alive = getattr(machine, "is_alive", None)
    return bool(alive()) if callable(alive) else True


class VolumeAccess:
    """The state ``Volumes``' operations share (``Volumes`` is made of these
    operations, one module a mechanism: checkpoints, mounts, files)."""

    def __init__(
        self,
        settings: Settings,
        *,
        machines: MachineLookup | None = None,
        helpers: HelperVms | None = None,
        guest: GuestFactory = guest_volumes,
        vm_owner: Callable[[], FileOwner] = lambda: None,
    ) -> None:
        self.settings = settings
        self.root = settings.volumes_dir
        self.store = AttachmentStore(self.root)
        self._machines = machines or (lambda vm_id: None)
        # Set once the node can start helper VMs (``kiln.node.volumes``).
        self.helpers = helpers
        self._guest = guest
        # The user a confined QEMU runs as (known once the node started).
        self._vm_owner = vm_owner
        self._locks = VolumeLocks()

    def paths(self, volume_id: str) -> VolumePaths:
        return volume_paths(self.root, volume_id)

    @property
    def tools_user(self) -> Identity:
        return Identity.of_user(self.settings.volume_tools_user)

    @contextlib.asynccontextmanager
    async def _locked(self, volume_id: str) -> AsyncIterator[tuple[VolumePaths, VolumeMeta]]:
        """The volume's lock, and its record with anything a dead process left
        half done finished or undone."""
        paths = self.paths(volume_id)
        if not paths.meta.exists():
            raise VolumeNotFound(f"no volume {volume_id} on this host")
        async with self._locks.hold(paths.lock):
            meta = read_meta(paths)
            remove_stale_views(paths)
            await chain.recover(paths, meta)
            open_to_vms(paths, meta, self._vm_owner())
            yield paths, meta

    def _running(self, attachment: Attachment) -> VmHandle | None:
        machine = self._machines(attachment.vm_id)
        if machine is None or not machine_is_alive(machine):
            return None
        return as_handle(machine)

    def _live(self, volume_id: str) -> list[Attachment]:
        return [a for a in self.store.of_volume(volume_id) if a.live_view]

    def _require_no_live_view(self, paths: VolumePaths, volume_id: str, doing: str) -> None:
        live = self._live(volume_id)
        if live:
            raise VolumeBusy(f"volume {volume_id} is mounted in {live[0].vm_id}; {doing} needs it unmounted")
        if procfs.holders(paths.layers):
            raise VolumeBusy(f"volume {volume_id} is open in a process this host has no record of")

    def _writer(self, live: list[Attachment]) -> tuple[Attachment | None, VmHandle | None]:
        """The rw mount among ``live`` (if any), and its VM if that runs now."""
        writer = next((a for a in live if not a.read_only), None)
        return writer, self._running(writer) if writer is not None else None

    async def _compact_if_idle(self, paths: VolumePaths, meta: VolumeMeta) -> int:
        if self.store.of_volume(meta.volume_id) or procfs.holders(paths.root):
            return 0
        return await chain.compact(paths, meta)
