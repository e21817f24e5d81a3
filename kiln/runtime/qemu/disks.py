"""qcow2 disks: overlays, switching a running VM to a new overlay, flattening,
copying a save."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import struct
import subprocess
import uuid
from pathlib import Path

from kiln.runtime.qemu.ownership import SAVED_FILE_MODE, Owner, give
from kiln.runtime.qemu.paths import SavedPaths
from kiln.runtime.qemu.process import run_tool
from kiln.runtime.qemu.qmp import QemuError, QmpConnection

log = logging.getLogger(__name__)

QEMU_IMG = "qemu-img"
QCOW2_MAGIC = b"QFI\xfb"
# No chain Kiln makes is deeper (overlay, saved disk, base snapshot, rootfs).
MAX_CHAIN_DEPTH = 16


def backing_chain(disk: Path) -> list[Path]:
    """The files below ``disk`` in its qcow2 backing chain, as their headers name
    them (relative names are relative to the naming image's directory). Read
    from the headers, not by qemu-img: it runs on every confined start."""
    chain: list[Path] = []
    current = disk
    while len(chain) < MAX_CHAIN_DEPTH:
        try:
            with current.open("rb") as image:
                header = image.read(20)
                if len(header) < 20 or header[:4] != QCOW2_MAGIC:
                    break  # a raw file: the chain ends here
                offset, size = struct.unpack(">QI", header[8:20])
                if offset == 0 or size == 0:
                    break
                image.seek(offset)
                name = os.fsdecode(image.read(size))
        except OSError:
            break
        current = current.parent / name  # an absolute name replaces the directory
        chain.append(current)
    return chain


async def disk_format(path: Path) -> str:
    info = json.loads(await run_tool(QEMU_IMG, "info", "--output=json", str(path)))
    return str(info["format"])


async def create_overlay(overlay: Path, backing: Path, size: int | None = None) -> None:
    """A qcow2 overlay on ``backing``. With ``size`` (and a qcow2 backing file)
    qemu-img need not open the backing file, which a running QEMU may hold."""
    overlay.unlink(missing_ok=True)
    if size is None:
        backing = backing.resolve()
        argv = ["-F", await disk_format(backing), "-b", str(backing), str(overlay)]
    else:
        argv = ["-F", "qcow2", "-b", str(backing), "-u", str(overlay), str(size)]
    await run_tool(QEMU_IMG, "create", "-q", "-f", "qcow2", *argv)


def growth_left(path: Path) -> int:
    """How much more a qcow2 disk can grow on the host: its virtual size (the
    header's) less the bytes it holds already (roughly: metadata aside)."""
    try:
        with path.open("rb") as disk:
            header = disk.read(32)
        allocated = path.stat().st_blocks * 512
    except OSError:
        return 0
    if len(header) < 32 or header[:4] != b"QFI\xfb":
        return 0
    virtual = int.from_bytes(header[24:32], "big")
    return max(virtual - allocated, 0)


async def root_disk(qmp: QmpConnection) -> dict:
    """``query-block``'s description of the VM's root disk as it is now."""
    blocks = await qmp.execute("query-block")
    for block in blocks if isinstance(blocks, list) else []:
        if block.get("device") == "root" and "inserted" in block:
            return dict(block["inserted"])
    raise QemuError("the VM has no root disk")


async def grow_root_disk(qmp: QmpConnection, size_bytes: int) -> None:
    """``block_resize`` of the root disk's top node (its overlay): its virtual
    size becomes ``size_bytes``; the virtio device tells the guest. A save
    records the new size, so overlays of restores are made that large too."""
    top = await root_disk(qmp)
    if int(top["image"]["virtual-size"]) > size_bytes:
        raise QemuError(f"the root disk is {top['image']['virtual-size']} bytes; it is never shrunk")
    await qmp.run("block_resize", {"node-name": str(top["node-name"]), "size": size_bytes})


async def switch_to_overlay(qmp: QmpConnection, overlay: Path) -> None:
    """Put ``overlay`` (whose backing file is the current top's file) on top of
    the root disk's chain; the old top becomes its read-only backing node.

    File locking is off on every node a VM writes through (see ``build_argv``):
    QEMU 7.2 fails to take back the write lock of a former top node when a
    migration hands the disks back (``cont`` says 'Failed to get "write" lock').
    Nothing else ever opens a VM's overlay, so the lock protects nothing here."""
    top = str((await root_disk(qmp))["node-name"])
    node = f"overlay-{uuid.uuid4().hex[:12]}"
    node_options: dict[str, object] = {
        "driver": "qcow2",
        "node-name": node,
        "file": {"driver": "file", "filename": str(overlay), "locking": "off"},
        "discard": "unmap",
        "backing": None,
    }
    await qmp.run("blockdev-add", node_options)
    await qmp.execute("blockdev-snapshot", node=top, overlay=node)


async def flatten_saved_disk(directory: Path) -> None:
    """Rewrite a saved disk onto the image alone (same content), see ``Hypervisor``."""
    disk = SavedPaths(directory).disk
    # -U: VMs may have the chain open; nothing writes to a saved disk.
    chain = json.loads(
        await run_tool(QEMU_IMG, "info", "-U", "--backing-chain", "--output=json", str(disk))
    )
    if len(chain) <= 2:
        return  # already on the image itself
    image = chain[-1]
    flat = disk.with_name(f".{disk.name}.flat")
    try:
        # A copy of the top layer, rebased in safe mode: every cluster the layers
        # between it and the image hold is written into it. (`convert -B` would
        # copy the top layer's clusters only: it takes the new base to equal the
        # old one, and the layers in between would be lost.)
        await run_tool("cp", "--reflink=auto", "--sparse=always", str(disk), str(flat))
        flat.chmod(0o600)
        await run_tool(
            QEMU_IMG, "rebase", "-U", "-f", "qcow2", "-b", image["filename"], "-F", image["format"], str(flat)
        )  # fmt: skip
        original = disk.stat()
        give(flat, Owner(original.st_uid, original.st_gid), SAVED_FILE_MODE)
        os.replace(flat, disk)
    finally:
        flat.unlink(missing_ok=True)
    log.info("flattened %s (%d layers) onto %s", disk, len(chain) - 1, image["filename"])


async def rebase_saved_disk(directory: Path, backing: Path) -> None:
    """Point a saved disk at ``backing``, the same content moved elsewhere (into
    the save: it becomes the save's, read-only)."""
    disk = SavedPaths(directory).disk
    backing = backing.resolve()
    original = disk.stat()
    give(backing, Owner(original.st_uid, original.st_gid), SAVED_FILE_MODE)
    backing_format = await disk_format(backing)
    disk.chmod(0o600)
    try:
        # -u: only the header changes; the content is the same file's, moved.
        await run_tool(
            QEMU_IMG, "rebase", "-u", "-f", "qcow2", "-F", backing_format, "-b", str(backing), str(disk)
        )  # fmt: skip
    finally:
        disk.chmod(SAVED_FILE_MODE)


async def copy_saved(source: Path, target: Path) -> None:
    """Copy the save in ``source`` to ``target`` (made here), its disk written
    on the image alone, so that either save may go first. A base file that a
    save holds (an imported image's rootfs) comes along into ``target``; the
    image's own rootfs, in the cache, is shared as every save shares it."""
    # -a keeps the owner and the read-only modes; reflinks and holes keep it cheap.
    await run_tool("cp", "-a", "--reflink=auto", "--sparse=always", str(source), str(target))
    try:
        await flatten_saved_disk(target)
        chain = backing_chain(SavedPaths(target).disk)
        bottom = chain[-1].resolve() if chain else None
        if bottom is None or not SavedPaths(bottom.parent).description.exists():
            return  # on the image's rootfs (or on nothing)
        kept = target / bottom.name
        if bottom.parent != source.resolve():
            await run_tool("cp", "--reflink=auto", "--sparse=always", str(bottom), str(kept))
        await rebase_saved_disk(target, kept)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise


def move_file(source: Path, target: Path) -> None:
    """Rename, or copy (keeping holes) when the two are on different file systems."""
    try:
        os.replace(source, target)
    except OSError as error:
        if error.errno != errno.EXDEV:
            raise
        subprocess.run(["cp", "--sparse=always", str(source), str(target)], check=True)
        source.unlink()
