"""Where a volume's files are and what ``volume.json`` says (pure: no QEMU, no tools).

One directory per volume under ``settings.volumes_dir``::

    <volume_id>/
      volume.json        this mechanism's record: size, layer chain, checkpoints, usage
      lock               flock'ed by whoever changes the files below
      layers/<T>.qcow2   the top (``meta.top``): the volume as it is now, writable
      layers/<L>.qcow2   frozen layers, read-only; a checkpoint is "the chain up to L"
      scratch/<vm>.<drive>.qcow2   throwaway tops of rw checkpoint mounts
      attachments/<vm>.<drive>.json   one per VM drive that has this volume open
      .raw-<token>/      a host-side raw view while e2fsprogs works on the image

The chain is linear: ``top -> layers[-1] -> ... -> layers[0]``, each file's
qcow2 header naming its backing file by a path relative to itself, so the
whole directory can move. A file keeps its name for life: QEMU reopens a
node by its file name (making it read-only when it becomes a backing node),
so renaming a file a VM has open would make QEMU open a different file.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kiln.volumes.errors import InvalidVolumeRequest, VolumeError, VolumeNotFound

VOLUME_FORMAT = 1
# A confined QEMU runs as the VMs' user (``kiln.runtime.jail``) and opens a
# volume's files by name: it may traverse these directories, never list them;
# the files it writes are that user's (frozen layers are 0444 anyway).
TRAVERSE_MODE = 0o711
WRITABLE_MODE = 0o600
# (uid, gid) of the VMs' user; None: QEMU runs as Kiln's own user.
FileOwner = tuple[int, int] | None
# Volume, checkpoint and VM ids become file names here: keep them plain.
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,95}$")
READ_ONLY_MODE = 0o444


def check_id(value: str, what: str) -> str:
    if not ID_PATTERN.match(value):
        raise InvalidVolumeRequest(
            f"{what} {value!r} must be 1-96 letters, digits, '-' or '_'"
        )
    return value


def new_layer_id() -> str:
    return f"l{secrets.token_hex(6)}"


@dataclass(frozen=True)
class VolumePaths:
    root: Path

    @property
    def volume_id(self) -> str:
        return self.root.name

    @property
    def meta(self) -> Path:
        return self.root / "volume.json"

    @property
    def lock(self) -> Path:
        return self.root / "lock"

    @property
    def layers(self) -> Path:
        return self.root / "layers"

    def layer(self, layer_id: str) -> Path:
        return self.layers / f"{layer_id}.qcow2"

    @property
    def scratch_dir(self) -> Path:
        return self.root / "scratch"

    def scratch(self, vm_id: str, drive_id: str) -> Path:
        return self.scratch_dir / f"{vm_id}.{drive_id}.qcow2"

    @property
    def attachments(self) -> Path:
        return self.root / "attachments"

    def attachment(self, vm_id: str, drive_id: str) -> Path:
        return self.attachments / f"{vm_id}.{drive_id}.json"

    def raw_dir(self, token: str) -> Path:
        return self.root / f".raw-{token}"


def volume_paths(volumes_dir: Path, volume_id: str) -> VolumePaths:
    return VolumePaths(volumes_dir.resolve() / check_id(volume_id, "volume id"))


# Backing-file names as written into qcow2 headers (relative to the file itself).


def layer_backing_name(layer_id: str) -> str:
    return f"{layer_id}.qcow2"


def scratch_backing_name(layer_id: str) -> str:
    return f"../layers/{layer_id}.qcow2"


@dataclass
class Layer:
    layer_id: str
    created_at: float
    # The checkpoint this layer is the top of; None once that checkpoint was
    # deleted (the layer stays while a later layer is written on top of it).
    checkpoint_id: str | None


@dataclass
class VolumeMeta:
    volume_id: str
    size_bytes: int
    created_at: float
    top: str  # the layer id of the writable top: the volume as it is now
    layers: list[Layer] = field(default_factory=list)  # the frozen ones, oldest first
    # The guest's view (statfs) the last time it was known, and when.
    used_bytes: int = 0
    used_at: float | None = None
    # What an offline count (blocks minus free blocks) includes that the
    # guest's statfs does not: ext4's own metadata (journal, inode tables).
    overhead_bytes: int = 0
    # A VM that had it mounted rw died: check the filesystem before the next mount.
    needs_check: bool = False
    # A multi-step change in flight (see ``kiln.volumes.chain.recover``).
    pending: dict[str, Any] | None = None
    format: int = VOLUME_FORMAT

    def checkpoint_layer(self, checkpoint_id: str) -> Layer | None:
        for layer in self.layers:
            if layer.checkpoint_id == checkpoint_id:
                return layer
        return None

    def layer_index(self, layer_id: str) -> int:
        for index, layer in enumerate(self.layers):
            if layer.layer_id == layer_id:
                return index
        raise VolumeError(f"volume {self.volume_id} has no layer {layer_id}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> VolumeMeta:
        data = json.loads(text)
        if data.get("format") != VOLUME_FORMAT:
            raise VolumeError(
                f"volume.json of format {data.get('format')!r}, expected {VOLUME_FORMAT}"
            )
        data["layers"] = [Layer(**layer) for layer in data.get("layers", [])]
        return cls(**data)


def top_path(paths: VolumePaths, meta: VolumeMeta) -> Path:
    return paths.layer(meta.top)


def read_meta(paths: VolumePaths) -> VolumeMeta:
    try:
        text = paths.meta.read_text()
    except FileNotFoundError:
        raise VolumeNotFound(f"no volume {paths.volume_id} on this host") from None
    return VolumeMeta.from_json(text)


def write_meta(paths: VolumePaths, meta: VolumeMeta) -> None:
    write_file_atomically(paths.meta, meta.to_json())


def write_file_atomically(path: Path, text: str) -> None:
    """Replace ``path`` so that a crash leaves the old or the new content, whole."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    with temporary.open("w") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def open_to_vms(paths: VolumePaths, meta: VolumeMeta, owner: FileOwner) -> None:
    """What a confined QEMU needs of the volume: its directories traversable,
    its writable top its user's. Idempotent (run under the lock before every
    operation, so a top a recovery finished is given too)."""
    for directory in (paths.root, paths.layers, paths.scratch_dir):
        if directory.is_dir():
            directory.chmod(TRAVERSE_MODE)
    give_to_vms(paths.layer(meta.top), owner)


def give_to_vms(path: Path, owner: FileOwner) -> None:
    """A file a VM's QEMU writes (a top, a throwaway top): its user's, 0600."""
    if owner is not None:
        os.chown(path, *owner)
    path.chmod(WRITABLE_MODE)


def allocated_bytes(path: Path) -> int:
    """Bytes a (sparse) file takes on disk."""
    try:
        return path.stat().st_blocks * 512
    except FileNotFoundError:
        return 0
