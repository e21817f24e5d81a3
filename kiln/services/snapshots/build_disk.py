"""A build's ``disk_size_gb``: the builder VM's root disk grown before the
other steps, so that what they install fits, and kept by the snapshot.

The host side is QMP ``block_resize`` of the builder's overlay
(``Node.grow_root_disk``); a save records the disk's virtual size, so every
VM restored from the snapshot gets an overlay that large. The guest side is
one build step: wait until the kernel sees the bigger ``/dev/vda``, then
``resize2fs`` it while mounted (every image variant installs e2fsprogs; the
root file system is ext4 on the whole disk). The disk budget counts the
bigger disk: the request is refused when the host cannot hold the whole of
it, and the growth is checked again just before it is made.
"""

from __future__ import annotations

from typing import Any

from kiln.services.errors import FieldProblem
from kiln.services.snapshots.build_plan import BuildStep

KEY = "disk_size_gb"
GIB = 1 << 30
ROOT_DEVICE = "vda"
# How long the guest may take to see the new size (its virtio config interrupt).
SEEN_POLLS, SEEN_POLL_SECONDS = 150, 0.2


def check_disk_size(args: dict[str, Any], image_disk_bytes: int, max_gb: int) -> tuple[int | None, list[FieldProblem]]:
    """The root disk's new size in bytes (None: the variant's as it is), and
    the problem of ``build_args.disk_size_gb`` if it is not a usable size."""
    value = args.get(KEY)
    if value is None:
        return None, []

    def refuse(message: str) -> tuple[int | None, list[FieldProblem]]:
        return None, [FieldProblem(("build_args", KEY), message)]

    # bool is an int to Python; 2.0 from JSON is not a whole number of GiB to the API.
    if not isinstance(value, int) or isinstance(value, bool):
        return refuse(f"must be a whole number of GiB (1 to {max_gb})")
    if value < 1 or value > max_gb:
        return refuse(f"must be between 1 and {max_gb} GiB (KILN_MAX_BUILD_DISK_GB)")
    if value * GIB < image_disk_bytes:
        return refuse(f"must be at least the image's disk ({image_disk_bytes / GIB:.2f} GiB); a build never shrinks it")
    return value * GIB, []


def filesystem_step(size_bytes: int) -> BuildStep:
    """The guest's half of the growth: its root file system filling the disk."""
    sectors = f"/sys/block/{ROOT_DEVICE}/size"
    wait = (
        f"i=0; while [ $(( $(cat {sectors}) * 512 )) -lt {size_bytes} ]; do "
        f"i=$((i + 1)); if [ $i -gt {SEEN_POLLS} ]; then "
        f"echo 'the guest does not see the bigger disk' >&2; exit 1; fi; sleep {SEEN_POLL_SECONDS}; done"
    )
    return BuildStep(
        f"grow the root file system to {size_bytes // GIB} GiB",
        f"{wait}; resize2fs /dev/{ROOT_DEVICE} && df -h /",
    )
