"""Snapshot logic that needs no VM: QEMU arguments of a restore, what may be
restored as what, base snapshot keys, and the API's snapshot rules (on fakes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln.config import Settings
from kiln.runtime.driver import BootImage, MachineSpec, SavedState
from kiln.runtime.errors import BootError
from kiln.runtime.qemu.cmdline import GUEST_RAM_ID, build_argv
from kiln.runtime.qemu.paths import RunPaths
from kiln.runtime.qemu.saving import check_restorable
from kiln.runtime.snapshots import BaseSnapshots, Shape

IMAGE = BootImage(
    variant="default",
    kernel=Path("/images/vmlinuz"),
    initrd=Path("/images/initrd.img"),
    rootfs=Path("/images/rootfs.ext4"),
    cmdline="console=ttyS0",
)
RUN_DIR = Path("/var/kiln/vms/vm-1")
SAVED_WITH_FILE = SavedState(
    Path("/snap/s1"), 256, 1, memory_file=Path("/snap/s1/memory.ram"), disk=Path("/snap/s1/disk.qcow2")
)


def spec(**changes: object) -> MachineSpec:
    fields: dict = {"vm_id": "vm-1", "vcpu_count": 1, "memory_mb": 256, "image": IMAGE, "run_dir": RUN_DIR}
    fields.update(changes)
    return MachineSpec(**fields)


def option_values(argv: list[str], option: str) -> list[str]:
    return [argv[index + 1] for index, value in enumerate(argv) if value == option]


def test_every_vm_has_its_ram_in_one_named_backend() -> None:
    argv = build_argv(spec(), "tcg", RunPaths(RUN_DIR))
    (backend,) = option_values(argv, "-object")
    assert backend.startswith(f"memory-backend-ram,id={GUEST_RAM_ID},size=256M")
    assert f"memory-backend={GUEST_RAM_ID}" in option_values(argv, "-machine")
    assert "-incoming" not in argv


def test_a_vm_made_for_a_base_snapshot_keeps_its_ram_in_a_shared_file() -> None:
    argv = build_argv(spec(memory_in_file=True), "tcg", RunPaths(RUN_DIR))
    (backend,) = option_values(argv, "-object")
    assert f"mem-path={RUN_DIR}/memory.ram,share=on" in backend


def test_a_restore_maps_the_snapshot_memory_privately_and_waits_for_its_state() -> None:
    argv = build_argv(spec(restore_from=SAVED_WITH_FILE), "tcg", RunPaths(RUN_DIR))
    (backend,) = option_values(argv, "-object")
    assert "mem-path=/snap/s1/memory.ram,share=off" in backend
    assert option_values(argv, "-incoming") == ["defer"]
    # The VM writes only to its own overlay.
    (drive,) = option_values(argv, "-drive")
    assert f"file={RUN_DIR}/overlay.qcow2" in drive


def test_a_restore_of_a_streamed_snapshot_gets_anonymous_ram() -> None:
    streamed = SavedState(Path("/snap/s2"), 256, 1, disk=Path("/snap/s2/disk.qcow2"))
    argv = build_argv(spec(restore_from=streamed), "tcg", RunPaths(RUN_DIR))
    assert option_values(argv, "-object")[0].startswith("memory-backend-ram,")


@pytest.mark.parametrize(
    ("changes", "accel", "named"),
    [({"memory_mb": 512}, "tcg", "memory_mb 256"), ({"vcpu_count": 2}, "tcg", "vcpu_count 1"),
     ({}, "kvm", "accel tcg")],
)  # fmt: skip
def test_a_saved_vm_restores_only_as_it_was(changes: dict, accel: str, named: str) -> None:
    description = {"memory_mb": 256, "vcpu_count": 1, "accel": "tcg"}
    check_restorable(spec(), "tcg", description)
    with pytest.raises(BootError, match=named):
        check_restorable(spec(**changes), accel, description)


class _Hypervisor:
    accel = "tcg"


def test_base_snapshot_keys_name_the_image_build_shape_and_accelerator(tmp_path: Path) -> None:
    files = {}
    for name in ("vmlinuz", "initrd.img", "rootfs.ext4"):
        files[name] = tmp_path / name
        files[name].write_bytes(name.encode())
    image = BootImage("default", files["vmlinuz"], files["initrd.img"], files["rootfs.ext4"], "quiet")
    snapshots = BaseSnapshots(Settings(cache_dir=tmp_path / "cache"), _Hypervisor())  # type: ignore[arg-type]
    key = snapshots.key(image, Shape(256, 1))
    assert key is not None and key.startswith("default-") and key.endswith("-256m-1c-tcg-f3")
    assert snapshots.key(image, Shape(512, 1)) != key
    files["rootfs.ext4"].write_bytes(b"rebuilt")
    assert snapshots.key(image, Shape(256, 1)) != key
    missing = BootImage("default", tmp_path / "no", tmp_path / "no", tmp_path / "no", "")
    assert snapshots.key(missing, Shape(256, 1)) is None


async def test_snapshot_routes_with_no_snapshot_made(run_app, admin_key) -> None:  # type: ignore[no-untyped-def]
    from unit.harness import key_headers

    async with run_app() as client:
        auth = key_headers(admin_key())
        assert (await client.get("/v1/snapshots", headers=auth)).json() == []
        for method in ("GET", "DELETE"):
            response = await client.request(method, "/v1/snapshots/snap-x", headers=auth)
            assert response.status_code == 404
        assert (await client.get("/v1/snapshots?type=odd", headers=auth)).status_code == 422
        created = await client.post("/v1/vms", json={"snapshot_id": "snap-x"}, headers=auth)
        assert created.status_code == 404 and "snapshot_id" in created.json()["detail"]
        assert (await client.post("/v1/vms/vm-x/snapshot", headers=auth)).status_code == 404
        assert (await client.post("/v1/vms/vm-x/suspend", headers=auth)).status_code == 404
        imported = await client.post("/v1/snapshots", json={"oci_image": "x"}, headers=auth)
        assert imported.status_code == 400
        assert (await client.get("/v1/snapshots")).status_code == 401


async def test_only_abandoned_base_snapshot_builds_are_removed(tmp_path: Path) -> None:
    import fcntl

    from kiln.runtime.snapshots import BUILD_LOCK_NAME

    class Destroyer(_Hypervisor):
        destroyed: list[str] = []

        async def destroy(self, vm_id: str, run_dir: Path) -> None:
            self.destroyed.append(vm_id)

    snapshots = BaseSnapshots(Settings(cache_dir=tmp_path), Destroyer())  # type: ignore[arg-type]
    building, abandoned = snapshots.root / ".build-aaaa", snapshots.root / ".build-bbbb"
    for directory in (building, abandoned):
        (directory / "vm").mkdir(parents=True)
        (directory / BUILD_LOCK_NAME).touch()
    with (building / BUILD_LOCK_NAME).open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        await snapshots.remove_unfinished_builds()
    assert building.exists() and not abandoned.exists()
    assert Destroyer.destroyed == ["base-bbbb"]


async def test_a_user_over_the_snapshot_quota_gets_429_and_nothing_is_recorded(  # type: ignore[no-untyped-def]
    run_app, admin_key, settings: Settings
) -> None:
    from unit.harness import key_headers

    settings.quota_snapshots = 0
    async with run_app() as client:
        auth = key_headers(admin_key())
        vm = (await client.post("/v1/vms", json={}, headers=auth)).json()
        refused = await client.post(f"/v1/vms/{vm['vm_id']}/snapshot", headers=auth)
        assert refused.status_code == 429 and "quota snapshots" in refused.json()["detail"]
        assert (await client.get("/v1/snapshots?type=user", headers=auth)).json() == []


def test_base_snapshot_shapes_per_image_build_are_counted(tmp_path: Path) -> None:
    class _Accel:
        accel = "tcg"

    settings = Settings(cache_dir=tmp_path / "cache")
    snapshots = BaseSnapshots(settings, _Accel())  # type: ignore[arg-type]
    image = BootImage("default", tmp_path / "k", tmp_path / "i", tmp_path / "r", "console=ttyS0")
    for path in (image.kernel, image.initrd, image.rootfs):
        path.write_bytes(b"x")
    assert snapshots.shapes_cached(image) == 0
    for shape in (Shape(256, 1), Shape(512, 2)):
        key = snapshots.key(image, shape)
        assert key is not None
        (snapshots.root / key).mkdir(parents=True)
    (snapshots.root / "minimal-0123456789abcdef-256m-1c-tcg-f3").mkdir()  # another image's
    assert snapshots.shapes_cached(image) == 2
