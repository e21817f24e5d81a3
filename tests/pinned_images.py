"""A cache dir whose image pointers cannot move under a test.

The image cache (``KILN_CACHE_DIR``) is shared by every checkout on a host,
and its ``<variant>.current`` pointers move whenever any checkout builds. A
server given ``pinned_cache`` sees this tree's builds, found or made in the
shared cache, and nothing else: its ``images/`` holds links to those builds
and pointers to them, while base snapshots (keyed by the build they were made
from), downloads and the base system stay shared.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from kiln.config import Settings
from kiln.runtime.images import ImageStore

SHARED_PARTS = ("downloads", "rootfs-base")


def pinned_cache(settings: Settings, variants: tuple[str, ...] = ("default",)) -> Path:
    """A new cache dir with this tree's builds of ``variants`` (built in the shared cache if missing)."""
    store = ImageStore(settings)
    pinned = Path(tempfile.mkdtemp(prefix="kiln-pinned-cache-", dir="/tmp"))
    pinned.chmod(0o755)  # confined QEMU walks through it to the images
    images = pinned / "images"
    images.mkdir()
    for variant in variants:
        image = store.build(variant)
        build_dir = Path(image.rootfs).parent
        (images / build_dir.name).symlink_to(build_dir)
        os.symlink(build_dir.name, images / f"{variant}.current")
    # Base snapshots one by one, at their real paths (as the bench links them):
    # saved states of VMs restored from them name those paths.
    base = pinned / "base-snapshots"
    base.mkdir()
    shared_base = settings.cache_dir / "base-snapshots"
    if shared_base.is_dir():
        for entry in shared_base.iterdir():
            if entry.is_dir() and not entry.name.startswith("."):
                (base / entry.name).symlink_to(entry.resolve())
    for part in SHARED_PARTS:
        (settings.cache_dir / part).mkdir(parents=True, exist_ok=True)
        (pinned / part).symlink_to(settings.cache_dir / part)
    return pinned
