"""Copying a save so that it stands alone (what a system snapshot is made of),
on real qcow2 chains made and compared by qemu-img."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

from kiln.runtime.qemu.disks import backing_chain, copy_saved


def raw(path: Path, fill: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes([fill]) * (1 << 20))
    return path


def save(directory: Path, backing: Path, backing_format: str, pattern: int, offset: int) -> Path:
    """A save's directory: its description and a disk on ``backing`` with data of its own."""
    directory.mkdir(parents=True)
    (directory / "state.json").write_text("{}")
    disk = directory / "disk.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", backing_format, "-b", str(backing), str(disk), "1M"],
        check=True,
    )
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {pattern} {offset} 64k", str(disk)],
                   check=True, capture_output=True)  # fmt: skip
    return directory


def same_content(first: Path, second: Path) -> bool:
    return subprocess.run(["qemu-img", "compare", "-q", str(first), str(second)], check=False).returncode == 0


def test_a_copy_stands_on_the_image_alone(tmp_path: Path) -> None:
    image_rootfs = raw(tmp_path / "cache" / "images" / "default-1" / "rootfs.ext4", 0x01)
    on_image = save(tmp_path / "snapshots" / "base-1", image_rootfs, "raw", 0x11, 0)
    child = save(tmp_path / "snapshots" / "snap-child", on_image / "disk.qcow2", "qcow2", 0x22, 65536)
    copy = tmp_path / "snapshots" / "snap-copy"
    asyncio.run(copy_saved(child, copy))
    assert (copy / "state.json").read_text() == "{}"
    assert same_content(child / "disk.qcow2", copy / "disk.qcow2")
    # The image's rootfs, in the cache, is shared; no other save is needed.
    assert [path.resolve() for path in backing_chain(copy / "disk.qcow2")] == [image_rootfs]
    assert (copy / "disk.qcow2").stat().st_mode & 0o777 == 0o400


def test_an_imported_rootfs_comes_along(tmp_path: Path) -> None:
    imported = tmp_path / "snapshots" / "snap-import"
    rootfs = raw(imported / "rootfs.ext4", 0x05)
    (imported / "state.json").write_text("{}")
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(rootfs), str(imported / "disk.qcow2"), "1M"],
        check=True,
    )
    child = save(tmp_path / "snapshots" / "snap-child", imported / "disk.qcow2", "qcow2", 0x44, 0)
    for source, copy in ((imported, tmp_path / "snapshots" / "copy-a"), (child, tmp_path / "snapshots" / "copy-b")):
        asyncio.run(copy_saved(source, copy))
        assert same_content(source / "disk.qcow2", copy / "disk.qcow2")
        assert [path.resolve() for path in backing_chain(copy / "disk.qcow2")] == [copy / "rootfs.ext4"]
    # Both copies outlive the saves they were made from.
    for gone in (imported, child):
        shutil.rmtree(gone)
    for copy in (tmp_path / "snapshots" / "copy-a", tmp_path / "snapshots" / "copy-b"):
        # info --backing-chain opens every file of the chain: none may be missing.
        info = ["qemu-img", "info", "--backing-chain", str(copy / "disk.qcow2")]
        subprocess.run(info, check=True, capture_output=True)
