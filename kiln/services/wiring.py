"""The node of this host and the VM-side services on top of it, wired once
(the app factory uses it; so do the service tests, with a fake hypervisor)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from kiln.browser.guest import WARM_UPS
from kiln.config import Settings
from kiln.crypto.master_key import derive_key, load_master_key
from kiln.node.host import build_node
from kiln.node.launcher import HelperLauncher, PipelineLauncher
from kiln.node.pool import WarmPool
from kiln.runtime.driver import BootImage, Hypervisor, SavedState
from kiln.runtime.images import UnknownVariant
from kiln.runtime.snapshots import BaseSnapshots, Shape
from kiln.services import vm_recovery
from kiln.services.admission import Admission
from kiln.services.background import BackgroundTasks
from kiln.services.disk_budget import DiskBudget
from kiln.services.egress_policy import EgressPolicies
from kiln.services.host_resources import StoreLedger
from kiln.services.memory_relief import MemoryReliever
from kiln.services.snapshots.builds import ImageBuilder
from kiln.services.snapshots.oci_import import ImageFiles, ImageImporter
from kiln.services.snapshots.restore import RestorePlanner
from kiln.services.snapshots.service import SnapshotService
from kiln.services.snapshots.system import SystemSnapshots
from kiln.services.snapshots.system_builds import SystemBuilds
from kiln.services.vault_bindings import VaultBindings, injections_of_vm
from kiln.services.vault_calls import VaultCallLog
from kiln.services.vaults import VaultService
from kiln.services.vm_policy import DEFAULT_IMAGE_VARIANT
from kiln.services.vms import ImageSource, VmService, new_vm_id
from kiln.services.volumes.files import VolumeFileService
from kiln.services.volumes.mounts import VolumeMounts
from kiln.services.volumes.service import VolumeService
from kiln.store.db import Database
from kiln.store.repositories import ResourceUsage
from kiln.vault.binding import VAULT_PURPOSE
from kiln.volumes import HelperBase, HelperVms, VolumeError

# Helper VMs (file access to unmounted volumes) are small: they only mount a
# volume and move bytes.
HELPER_SHAPE = Shape(memory_mb=256, vcpu_count=1)


@dataclass(frozen=True)
class VmServices:
    vms: VmService
    importer: ImageImporter
    builder: ImageBuilder
    background: BackgroundTasks
    volumes: VolumeService
    volume_files: VolumeFileService
    mounts: VolumeMounts
    vaults: VaultService
    vault_calls: VaultCallLog
    reliever: MemoryReliever
    system_snapshots: SystemSnapshots
    system_builds: SystemBuilds

    async def start(self) -> None:
        """Settle what an earlier server left, then start the loops and the pool."""
        vms = self.vms
        await vms.node.start_host()
        await self.volumes.start()
        await vm_recovery.recover(vms, vms.db)
        await self.mounts.settle()
        await vms.snapshots.fail_unfinished()
        await vms.snapshots.housekeeping.start()
        await vms.planner.base.remove_unfinished_builds()
        await self.importer.remove_unfinished()
        await self.builder.remove_unfinished()
        await self.system_builds.remove_unfinished()
        vms.start_loops()
        self.vault_calls.start()
        self.reliever.start()
        if vms.pool is not None:
            await vms.pool.start()

    async def stop(self) -> None:
        """Stop the loops and background work; running VMs stay for the next start."""
        vms = self.vms
        if vms.pool is not None:
            await vms.pool.stop()
        await vms.snapshots.housekeeping.stop()
        await self.reliever.stop()
        await self.vault_calls.stop()
        await vms.stop()
        await self.background.stop()
        if vms.node.volumes is not None:
            await vms.node.volumes.close()


def build_vm_services(
    settings: Settings, db: Database, hypervisor: Hypervisor, images: ImageSource
) -> VmServices:
    node = build_node(settings, hypervisor, StoreLedger(db), injections_of=partial(injections_of_vm, db))
    background = BackgroundTasks()
    base = BaseSnapshots(settings, hypervisor, PipelineLauncher(node), WARM_UPS)
    planner = RestorePlanner(db, node, base, background, settings.max_base_shapes)
    disk = DiskBudget(settings.data_dir, settings.disk_floor_mb * 2**20, node.reserved_disk_bytes)
    snapshots = SnapshotService(settings, db, node, background, disk)
    pool = None
    if settings.pool_size > 0:
        shape = Shape(settings.default_memory_mb, settings.default_vcpu_count)

        async def default_base() -> tuple[BootImage, SavedState] | None:
            image = images.get(DEFAULT_IMAGE_VARIANT)
            if image is None:
                return None
            _, saved = await planner.ensure_base_snapshot(image, shape)
            return image, saved

        pool = WarmPool(
            node, settings.vms_dir, settings.pool_size, default_base, new_vm_id, warm_up=settings.pool_warm_up
        )
    if node.volumes is not None:

        async def helper_base() -> HelperBase:
            image = images.get(DEFAULT_IMAGE_VARIANT)
            if image is None:
                raise VolumeError(f"file access to unmounted volumes needs the {DEFAULT_IMAGE_VARIANT} image built")
            _, saved = await planner.ensure_base_snapshot(image, HELPER_SHAPE)
            return HelperBase(image, saved)

        node.volumes.use_helpers(HelperVms(settings, HelperLauncher(node), helper_base))
    # The node's own VMs (idle pool VMs and volume helpers among them) count against the host.
    admission = Admission(settings, lambda: ResourceUsage(*node.transient_usage()))
    # The package-manager group is read now: a broken file stops the start.
    egress = EgressPolicies.load(settings.egress_package_managers_file)
    mounts = VolumeMounts(db, node, background)
    bindings = VaultBindings(db, node)
    vms = VmService(
        settings, db, node, images, snapshots, planner, admission, disk, bindings, pool, mounts, egress=egress
    )
    importer = ImageImporter(settings, db, node, images if isinstance(images, ImageFiles) else None, background)
    volumes = VolumeService(settings, db, node)
    files = VolumeFileService(db, node, settings.max_upload_bytes, settings.max_download_bytes)
    # The master key first made here, before the egress daemon (which opens what it seals) starts.
    vault_key = derive_key(load_master_key(settings.data_dir, settings.master_key), VAULT_PURPOSE)
    vaults = VaultService(db, vault_key, bindings)
    builder = ImageBuilder(settings, vms, background, partial(variant_packages, images))
    reliever = MemoryReliever(settings, vms)
    system_snapshots = SystemSnapshots(settings, db, node, images, planner, snapshots, disk, background)
    system_builds = SystemBuilds(db, system_snapshots, builder, importer, snapshots, background)
    return VmServices(
        vms, importer, builder, background, volumes, files, mounts, vaults, VaultCallLog(db, node), reliever,
        system_snapshots, system_builds,
    )


def variant_packages(images: ImageSource, variant: str) -> tuple[str, ...]:
    """The Debian packages the variant's image installs (none known: empty)."""
    manifest = getattr(images, "manifest", None)
    try:
        return tuple(manifest(variant).packages) if manifest is not None else ()
    except UnknownVariant:
        return ()
