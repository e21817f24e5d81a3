"""Reading a qcow2 backing chain from the headers (what a confined QEMU must see)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from kiln.runtime.qemu.disks import backing_chain


def qcow2(path: Path, backing: str | None = None, backing_format: str = "qcow2") -> Path:
    argv = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing is not None:
        argv += ["-F", backing_format, "-b", backing, "-u"]
    subprocess.run([*argv, str(path), "64M"], check=True)
    return path


def test_the_chain_down_to_a_raw_file_absolute_and_relative_names(tmp_path: Path) -> None:
    (tmp_path / "base").mkdir()
    (tmp_path / "saves").mkdir()
    rootfs = tmp_path / "base" / "rootfs.ext4"
    rootfs.write_bytes(b"\0" * 4096)
    base = qcow2(tmp_path / "base" / "disk.qcow2", str(rootfs), "raw")
    saved = qcow2(tmp_path / "saves" / "disk.qcow2", "../base/disk.qcow2")
    top = qcow2(tmp_path / "overlay.qcow2", str(saved))
    chain = backing_chain(top)
    assert [path.resolve() for path in chain] == [saved, base, rootfs]


def test_no_backing_file_and_a_missing_link_end_the_chain(tmp_path: Path) -> None:
    assert backing_chain(qcow2(tmp_path / "alone.qcow2")) == []
    dangling = qcow2(tmp_path / "top.qcow2", str(tmp_path / "gone.qcow2"))
    assert backing_chain(dangling) == [tmp_path / "gone.qcow2"]
    assert backing_chain(tmp_path / "nothing-here.qcow2") == []
