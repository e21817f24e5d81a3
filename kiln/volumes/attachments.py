"""Which VM has which volume file open: one JSON record per VM drive.

A record is written before its drive exists and removed once the drive and
anything made for it (a throwaway layer) are gone, in the volume's own
directory (``attachments/<vm_id>.<drive_id>.json``). The records are this
host's truth for "who holds this volume": the exclusivity checks (one rw
writer of a volume, or readers only), the "nothing has it open" check before
e2fsprogs touch an image, the layout a resumed VM needs (drive ids and SCSI
targets), and the leftovers of VMs that died.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from kiln.volumes.errors import InvalidVolumeRequest
from kiln.volumes.layout import VolumePaths, check_id, write_file_atomically

# Where a volume may not be mounted in a guest: the system's own directories
# (and the agent's), which a mount would hide from everything running there.
FORBIDDEN_MOUNT_ROOTS = (
    "/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/opt/kiln",
    "/proc", "/run", "/sbin", "/sys", "/usr",
)  # fmt: skip
MAX_MOUNT_PATH = 1024
# Every drive this package plugs has an id (node name, device id, serial) with this prefix.
DRIVE_PREFIX = "vol-"

# A record's states, in order: planned (recorded, the drive may not exist
# yet), attached (the VM has the drive), mounted (the guest has it mounted),
# detached (the guest unmounted it cleanly and the host unplugged it).
PLANNED = "planned"
ATTACHED = "attached"
MOUNTED = "mounted"
DETACHED = "detached"


def check_mount_path(path: str) -> str:
    """An absolute, normalised guest path that is not a system directory."""
    if not path.startswith("/") or "\0" in path or len(path) > MAX_MOUNT_PATH:
        raise InvalidVolumeRequest(
            f"mount_path must be an absolute path (at most {MAX_MOUNT_PATH} bytes)"
        )
    if posixpath.normpath(path) != path or path.startswith("//"):
        raise InvalidVolumeRequest(
            f"mount_path {path!r} is not normalised (no '..', '.', '//' or trailing '/')"
        )
    if path == "/":
        raise InvalidVolumeRequest("a volume cannot be mounted over the guest's root")
    for root in FORBIDDEN_MOUNT_ROOTS:
        if path == root or path.startswith(root + "/"):
            raise InvalidVolumeRequest(
                f"a volume cannot be mounted at {path}: {root} belongs to the system"
            )
    return path


def drive_id_for(volume_id: str, mount_path: str, checkpoint_id: str | None) -> str:
    """Stable for a mount, so a retried attach finds its own record; short
    enough for a QEMU node name and a SCSI serial (36 characters at most)."""
    digest = hashlib.sha256(
        f"{volume_id}\0{mount_path}\0{checkpoint_id or ''}".encode()
    ).hexdigest()
    return f"{DRIVE_PREFIX}{digest[:12]}"


@dataclass(frozen=True)
class Attachment:
    vm_id: str
    drive_id: str
    volume_id: str
    mount_path: str
    read_only: bool
    checkpoint_id: str | None
    scsi_id: int
    # The file the drive opens: the volume's top (the volume as it is), a frozen
    # layer (a checkpoint mounted ro, or a ro mount from before a checkpoint)
    # or this drive's scratch layer.
    image: str
    scratch: bool = False
    state: str = PLANNED
    created_at: float = field(default_factory=time.time)
    # A stand-in for a drive a restored VM's saved state had: the drive's
    # content at the save (a checkpoint's layer, a throwaway top on it for a
    # writable drive), at the saved SCSI target, under the saved drive id.
    # Never kept: once the VM is up it gives way to the real mount.
    placeholder: bool = False

    @property
    def live_view(self) -> bool:
        """It shows the volume as it is now (not a checkpoint)."""
        return self.checkpoint_id is None

    @property
    def writes_volume(self) -> bool:
        return self.live_view and not self.read_only

    def with_state(self, state: str) -> Attachment:
        return replace(self, state=state)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Attachment:
        return cls(**json.loads(text))


class AttachmentStore:
    def __init__(self, volumes_dir: Path) -> None:
        self.volumes_dir = volumes_dir.resolve()

    def paths(self, volume_id: str) -> VolumePaths:
        return VolumePaths(self.volumes_dir / check_id(volume_id, "volume id"))

    def save(self, attachment: Attachment) -> None:
        paths = self.paths(attachment.volume_id)
        paths.attachments.mkdir(mode=0o700, exist_ok=True)
        write_file_atomically(
            paths.attachment(attachment.vm_id, attachment.drive_id),
            attachment.to_json(),
        )

    def remove(self, attachment: Attachment) -> None:
        self.paths(attachment.volume_id).attachment(
            attachment.vm_id, attachment.drive_id
        ).unlink(missing_ok=True)

    def of_volume(self, volume_id: str) -> list[Attachment]:
        return self._load(self.paths(volume_id).attachments.glob("*.json"))

    def of_vm(self, vm_id: str) -> list[Attachment]:
        check_id(vm_id, "vm id")
        found = self._load(self.volumes_dir.glob(f"*/attachments/{vm_id}.*.json"))
        return sorted((a for a in found if a.vm_id == vm_id), key=lambda a: a.scsi_id)

    def all(self) -> list[Attachment]:
        return self._load(self.volumes_dir.glob("*/attachments/*.json"))

    def _load(self, files: Iterable[Path]) -> list[Attachment]:
        loaded = []
        for path in sorted(files):
            try:
                loaded.append(Attachment.from_json(path.read_text()))
            except FileNotFoundError:
                continue  # removed meanwhile
        return loaded
