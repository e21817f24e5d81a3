"""What ``kiln images prune`` keeps and removes, on a cache laid out by the test
(no QEMU: backing chains and processes come from the test)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from kiln.config import Settings
from kiln.runtime.driver import BootImage
from kiln.runtime.prune import plan_prune, remove
from kiln.runtime.snapshots import image_digest


def build(settings: Settings, name: str) -> Path:
    directory = settings.images_dir / name
    directory.mkdir(parents=True)
    for file in ("vmlinuz", "initrd.img", "rootfs.ext4"):
        (directory / file).write_bytes(b"x" * 4096)
    (directory / "build.json").write_text(json.dumps({"cmdline": "console=ttyS0"}))
    return directory


def base(settings: Settings, key: str) -> Path:
    directory = settings.cache_dir / "base-snapshots" / key
    directory.mkdir(parents=True)
    (directory / "disk.qcow2").write_bytes(b"q" * 4096)
    (directory / "memory.ram").write_bytes(b"m" * 4096)
    return directory


def test_only_what_nothing_needs_goes(settings: Settings) -> None:
    old_used = build(settings, "default-aaaa")  # under a base snapshot a suspended VM needs
    old_unused = build(settings, "default-bbbb")
    current = build(settings, "default-cccc")
    os.symlink("default-cccc", settings.images_dir / "default.current")
    in_use = build(settings, "minimal-dddd")  # a process (another server's VM) maps it
    (settings.images_dir / ".build-default-x").mkdir()

    digest = image_digest(
        BootImage("default", current / "vmlinuz", current / "initrd.img", current / "rootfs.ext4", "console=ttyS0")
    )
    current_base = base(settings, f"default-{digest}-256m-1c-tcg-f3")
    old_base = base(settings, "default-0123456789abcdef-256m-1c-tcg-f3")
    stale_base = base(settings, "default-fedcba9876543210-512m-2c-tcg-f3")

    vm_dir = settings.data_dir / "vms" / "vm-1"
    vm_dir.mkdir(parents=True)
    (vm_dir / "overlay.qcow2").write_bytes(b"o")
    chains = {
        vm_dir / "overlay.qcow2": [str(vm_dir / "overlay.qcow2"), str(old_base / "disk.qcow2")],
        old_base / "disk.qcow2": [str(old_base / "disk.qcow2"), str(old_used / "rootfs.ext4")],
        current_base / "disk.qcow2": [str(current_base / "disk.qcow2"), str(current / "rootfs.ext4")],
    }
    plan = plan_prune(
        settings,
        [settings.data_dir],
        chain=lambda disk: chains.get(disk, [str(disk)]),
        processes=lambda: [("/usr/lib/x86_64-linux-gnu/libc.so.6", "p"), (str(in_use / "rootfs.ext4"), "pid 7")],
    )
    kept = {path.name: why for path, why in plan.keep.items()}
    assert set(kept) == {old_used.name, current.name, in_use.name, current_base.name, old_base.name}
    assert "current build" in kept[current.name] and "pid 7" in kept[in_use.name]
    assert "overlay.qcow2" in kept[old_base.name] and old_base.name in kept[old_used.name]
    assert {path.name for path in plan.remove} == {old_unused.name, stale_base.name}
    assert plan.bytes_freed() > 0

    freed = remove(plan)
    assert freed > 0 and not old_unused.exists() and not stale_base.exists()
    assert current.exists() and old_used.exists() and (settings.images_dir / ".build-default-x").exists()


def test_a_json_state_file_naming_a_base_snapshot_keeps_it(settings: Settings) -> None:
    kept_base = base(settings, "default-1111111111111111-256m-1c-tcg-f3")
    snapshot = settings.data_dir / "snapshots" / "snap-1"
    snapshot.mkdir(parents=True)
    (snapshot / "state.json").write_text(json.dumps({"memory_backing": {"path": str(kept_base / "memory.ram")}}))
    plan = plan_prune(settings, [settings.data_dir], chain=lambda disk: [str(disk)], processes=lambda: [])
    assert [path.name for path in plan.keep] == [kept_base.name] and plan.remove == []
