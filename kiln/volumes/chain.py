"""The volume's qcow2 chain: checkpoints are frozen layers, copy-on-write.

A checkpoint freezes the current top (it becomes read-only and is never
written again) and puts a new, empty top on it: constant time whatever the
volume holds, and only what is written afterwards takes new space. Reading a
checkpoint is reading the chain up to its layer, so mounting one needs no
copy either (read-only: the layer itself; read-write: a throwaway top on it).

No file is ever renamed: QEMU reopens a node by its file name when the node
becomes a read-only backing node, so a file renamed under a running VM would
be swapped for whatever now has its name. The top is named by ``meta.top``.

Deleting a checkpoint forgets it at once; its layer stays while the layer
above is written on top of it, until ``compact`` merges it into that layer
(``qemu-img rebase``, while no VM has the volume) and removes the file.

Each multi-step change writes its intent to ``volume.json`` first
(``meta.pending``), so ``recover`` can finish or undo it after a crash.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from kiln.volumes import procfs, tools
from kiln.volumes.errors import VolumeError
from kiln.volumes.layout import (
    READ_ONLY_MODE,
    FileOwner,
    Layer,
    VolumeMeta,
    VolumePaths,
    give_to_vms,
    layer_backing_name,
    new_layer_id,
    scratch_backing_name,
    write_meta,
)

log = logging.getLogger(__name__)

# Called with the new top once its file exists; a running VM switches its drive
# onto it (``hotplug.snapshot_drive``). None: no VM writes the volume now.
SwitchTop = Callable[[Path], Awaitable[None]]


async def checkpoint(
    paths: VolumePaths,
    meta: VolumeMeta,
    checkpoint_id: str,
    switch: SwitchTop | None = None,
    owner: FileOwner = None,
) -> Layer:
    """Freeze the volume's current content as ``checkpoint_id``.

    1. record the intent; 2. create the new top, whose backing file is the
    current top; 3. ``switch``: a VM writing the volume moves its writes onto
    the new top; 4. make the old top read-only; 5. commit: the old top is now
    the checkpoint's layer. Returns that layer."""
    frozen = Layer(
        layer_id=meta.top, created_at=time.time(), checkpoint_id=checkpoint_id
    )
    new_id = new_layer_id()
    new_file = paths.layer(new_id)
    meta.pending = {
        "op": "checkpoint",
        "new_top": new_id,
        "old_top": meta.top,
        "checkpoint_id": checkpoint_id,
    }
    write_meta(paths, meta)
    try:
        await tools.create_qcow2(
            new_file, meta.size_bytes, layer_backing_name(meta.top)
        )
        give_to_vms(new_file, owner)
        if switch is not None:
            await switch(new_file)
    except BaseException:
        new_file.unlink(missing_ok=True)
        meta.pending = None
        write_meta(paths, meta)
        raise
    paths.layer(frozen.layer_id).chmod(READ_ONLY_MODE)
    meta.layers.append(frozen)
    meta.top = new_id
    meta.pending = None
    write_meta(paths, meta)
    return frozen


def forget_checkpoint(
    paths: VolumePaths, meta: VolumeMeta, checkpoint_id: str
) -> Layer:
    layer = meta.checkpoint_layer(checkpoint_id)
    if layer is None:
        raise VolumeError(f"volume {meta.volume_id} has no checkpoint {checkpoint_id}")
    layer.checkpoint_id = None
    write_meta(paths, meta)
    return layer


def child_of(paths: VolumePaths, meta: VolumeMeta, index: int) -> Path:
    """The file written on top of frozen layer ``index``."""
    if index + 1 < len(meta.layers):
        return paths.layer(meta.layers[index + 1].layer_id)
    return paths.layer(meta.top)


def parent_name(meta: VolumeMeta, index: int) -> str | None:
    return layer_backing_name(meta.layers[index - 1].layer_id) if index > 0 else None


async def compact(paths: VolumePaths, meta: VolumeMeta) -> int:
    """Merge every layer whose checkpoint was deleted into the layer above it
    and remove it. Only while no VM has any file of the volume open (the
    caller checks). Returns how many layers went."""
    removed = 0
    index = 0
    while index < len(meta.layers):
        if meta.layers[index].checkpoint_id is not None:
            index += 1
            continue
        await merge_up(paths, meta, index)
        removed += 1
    return removed


async def merge_up(paths: VolumePaths, meta: VolumeMeta, index: int) -> None:
    """Layer ``index`` into its child: the child's header is pointed at the
    layer's parent, and qemu-img copies into the child whatever of the layer
    the child did not overwrite (its content as read stays the same)."""
    layer = meta.layers[index]
    child = child_of(paths, meta, index)
    meta.pending = {"op": "compact", "layer_id": layer.layer_id}
    write_meta(paths, meta)
    await rebase_keeping_mode(child, parent_name(meta, index))
    paths.layer(layer.layer_id).unlink()
    del meta.layers[index]
    meta.pending = None
    write_meta(paths, meta)
    log.info(
        "volume %s: merged layer %s into %s", meta.volume_id, layer.layer_id, child.name
    )


async def rebase_keeping_mode(path: Path, backing: str | None) -> None:
    mode = path.stat().st_mode & 0o777
    path.chmod(0o600)
    try:
        await tools.rebase(path, backing)
    finally:
        path.chmod(mode)


async def recover(paths: VolumePaths, meta: VolumeMeta) -> None:
    """Finish or undo what ``meta.pending`` says was in flight when a process died."""
    pending = meta.pending
    if pending is None:
        return
    if pending["op"] == "checkpoint":
        await recover_checkpoint(paths, meta, pending)
    elif pending["op"] == "compact":
        layer_id = str(pending["layer_id"])
        index = meta.layer_index(layer_id)
        child = child_of(paths, meta, index)
        if await tools.backing_name(child) != parent_name(meta, index):
            await rebase_keeping_mode(child, parent_name(meta, index))
        paths.layer(layer_id).unlink(missing_ok=True)
        del meta.layers[index]
        log.warning(
            "volume %s: finished an interrupted merge of layer %s",
            meta.volume_id,
            layer_id,
        )
    else:
        raise VolumeError(
            f"volume {meta.volume_id}: unknown pending operation {pending!r}"
        )
    meta.pending = None
    write_meta(paths, meta)


async def recover_checkpoint(
    paths: VolumePaths, meta: VolumeMeta, pending: dict
) -> None:
    """Forward if the new top exists and a VM may write to it (it switched, or
    no VM has the volume: either way the chain reads the same); back if a VM
    still writes to the old top and not to the new one."""
    new_file = paths.layer(str(pending["new_top"]))
    old_file = paths.layer(str(pending["old_top"]))
    if meta.top != pending["old_top"] or not new_file.exists():
        return  # committed already, or nothing was made yet
    if procfs.is_held(old_file) and not procfs.is_held(new_file):
        new_file.unlink()
        log.warning("volume %s: undid an interrupted checkpoint", meta.volume_id)
        return
    old_file.chmod(READ_ONLY_MODE)
    meta.layers.append(Layer(meta.top, time.time(), str(pending["checkpoint_id"])))
    meta.top = str(pending["new_top"])
    log.warning("volume %s: finished an interrupted checkpoint", meta.volume_id)


async def make_scratch(
    paths: VolumePaths, layer_id: str, vm_id: str, drive_id: str, owner: FileOwner = None
) -> Path:
    """A throwaway top on a checkpoint's layer, for a rw mount of that checkpoint."""
    layer = paths.layer(layer_id)
    size = int((await tools.image_info(layer))["virtual-size"])
    scratch = paths.scratch(vm_id, drive_id)
    paths.scratch_dir.mkdir(mode=0o700, exist_ok=True)
    scratch.unlink(missing_ok=True)
    await tools.create_qcow2(scratch, size, scratch_backing_name(layer_id))
    give_to_vms(scratch, owner)
    return scratch
