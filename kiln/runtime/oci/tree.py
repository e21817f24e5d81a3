"""Paths inside an unpacked tree, resolved as the guest will see them.

Used by the layer unpacking (``layers``) and by the image builder
(``kiln.runtime.images``): nothing here ever reaches a host path outside the
tree, whatever symlinks the tree holds.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from kiln.runtime.oci.layout import OciError

MAX_SYMLINK_HOPS = 40


def entry_path(name: str) -> str:
    """A tar entry's name as a path relative to the tree; OciError if it climbs out."""
    parts = [part for part in name.replace("\\", "/").split("/") if part not in ("", ".")]
    if ".." in parts:
        raise OciError(f"layer entry {name!r} climbs out of the root (..)")
    if any("\0" in part for part in parts):
        raise OciError(f"layer entry {name!r} has a NUL byte")
    return "/".join(parts)


def resolve_in_root(root: str | Path, path: str, *, follow_last: bool = True) -> str:
    """Where ``path`` of the guest's tree is on the host, resolving symlinks the
    way the guest would see them with ``root`` as ``/``: an absolute target
    starts again at ``root`` and ``..`` never climbs above it. Components that do
    not exist are taken literally. With ``follow_last=False`` a final symlink is
    itself the answer (for unlinking or replacing it)."""
    root = os.fspath(root)
    pending = [part for part in path.split("/") if part not in ("", ".")]
    resolved: list[str] = []
    hops = 0
    while pending:
        part = pending.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = os.path.join(root, *resolved, part)
        try:
            info = os.lstat(candidate)
        except (FileNotFoundError, NotADirectoryError):
            resolved.append(part)
            continue
        if stat.S_ISLNK(info.st_mode) and (pending or follow_last):
            hops += 1
            if hops > MAX_SYMLINK_HOPS:
                raise OciError(f"too many levels of symbolic links resolving /{path}")
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            pending = [p for p in target.split("/") if p not in ("", ".")] + pending
            continue
        resolved.append(part)
    return os.path.join(root, *resolved)


def ensure_directory(root: str, path: str) -> str:
    """The host path of directory ``path`` of the tree, made (mode 0755) where missing."""
    resolved = resolve_in_root(root, path)
    relative = os.path.relpath(resolved, root)
    current = root
    for part in [] if relative == "." else relative.split("/"):
        current = os.path.join(current, part)
        try:
            info = os.lstat(current)
        except FileNotFoundError:
            os.mkdir(current, 0o755)
            continue
        if not stat.S_ISDIR(info.st_mode):
            raise OciError(f"/{path} is needed as a directory but /{os.path.relpath(current, root)} is not one")
    return resolved


def remove_path(path: str) -> None:
    """Remove whatever is at ``path`` (never following a symlink)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(info.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)
