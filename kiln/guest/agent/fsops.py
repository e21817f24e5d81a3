"""The rest of a file system, for the SSH gateway's SFTP and scp: directory
entries with their attributes (paged), remove, mkdir, rmdir, rename,
set_attrs, readlink, symlink, realpath. Each is one system call (or a few),
on paths as given: the guest is the user's, the agent runs as root in it."""

from __future__ import annotations

import os
from typing import Any

from .args import arg
from .errors import AgentError
from .files import attributes
from .wire import Emit, Handler

MAX_ENTRIES = 1000


def handlers() -> dict[str, Handler]:
    return {
        "list_dir": op_list_dir,
        "remove": op_remove,
        "mkdir": op_mkdir,
        "rmdir": op_rmdir,
        "rename": op_rename,
        "set_attrs": op_set_attrs,
        "readlink": op_readlink,
        "symlink": op_symlink,
        "realpath": op_realpath,
    }


def op_list_dir(args: dict[str, Any], emit: Emit) -> dict[str, Any]:
    """{"path", "offset"=0, "limit"=1000} -> {"entries": [{"name", "st_mode", "size",
    "uid", "gid", "atime", "mtime", "target"?}], "done"}: one page of a directory,
    sorted by name, symlinks described themselves (with their target)."""
    path = arg(args, "path", str)
    offset = arg(args, "offset", int, 0)
    limit = arg(args, "limit", int, MAX_ENTRIES)
    if offset < 0 or not 1 <= limit <= MAX_ENTRIES:
        raise AgentError("EINVAL", f"offset must be >= 0 and limit between 1 and {MAX_ENTRIES}")
    names = sorted(os.listdir(path))
    entries = []
    for name in names[offset : offset + limit]:
        full = os.path.join(path, name)
        try:
            info = os.lstat(full)
        except OSError:
            continue  # removed meanwhile
        entry = {"name": name, **attributes(info)}
        if os.path.islink(full):
            try:
                entry["target"] = os.readlink(full)
            except OSError:
                pass
        entries.append(entry)
    return {"entries": entries, "done": offset + limit >= len(names)}


def op_remove(args: dict[str, Any], emit: Emit) -> dict[str, Any]:
    """{"path"} -> {}: a file or symlink (a directory is EISDIR: use rmdir)."""
    path = arg(args, "path", str)
    if os.path.isdir(path) and not os.path.islink(path):
        raise AgentError("EISDIR", f"{path} is a directory")
    os.unlink(path)
    return {}


def op_mkdir(args: dict[str, Any], emit: Emit) -> dict[str, Any]:
    """{"path", "mode"=0o755} -> {}: one directory (its parent must exist)."""
    path = arg(args, "path", str)
    mode = arg(args, "mode", int, 0o755)
    os.mkdir(path, mode)
    os.chmod(path, mode)  # not filtered by the umask
    return {}


def op_rmdir(args: dict[str, Any], emit: Emit) -> dict[str, Any]:
    """{"path"} -> {}: an empty directory."""
    os.rmdir(arg(args, "path", str))
    return {}


def op_rename(args: dict[str, Any], emit: Emit) -> dict[str, Any]:
    """{"old", "new", "overwrite"=false} -> {}: without overwrite an existing
    ``new`` is EEXIST (SFTP's rename); with it, replaced atomically (posix-rename)."""
    old, new = arg(args, "old", str), arg(args, "new", str)
    if not arg(args, "overwrite", bool, False) and os.path.lexists(new):
        raise AgentError("EEXIST", f"{new} exists")
    os.replace(old, new)
    return {}


def op_set_attrs(args: dict[str, Any], emit: Emit) -> dict[str, Any]:
    """{"path", "mode"?, "uid"?, "gid"?, "atime"?, "mtime"?, "size"?} -> the new
    attributes: only what is given changes (times need both)."""
    path = arg(args, "path", str)
    size = arg(args, "size", int, None)
    if size is not None:
        if size < 0:
            raise AgentError("EINVAL", "size must be >= 0")
        os.truncate(path, size)
    uid, gid = arg(args, "uid", int, None), arg(args, "gid", int, None)
    if uid is not None or gid is not None:
        os.chown(path, -1 if uid is None else uid, -1 if gid is None else gid)
    mode = arg(args, "mode", int, None)
    if mode is not None:
        os.chmod(path, mode & 0o7777)
    atime, mtime = arg(args, "atime", (int, float), None), arg(args, "mtime", (int, float), None)
    if atime is not None or mtime is not None:
        if atime is None or mtime is None:
            raise AgentError("EINVAL", "atime and mtime go together")
        os.utime(path, (atime, mtime))
    return attributes(os.stat(path))


def op_readlink(args: dict[str, Any], emit: Emit) -> dict[str, Any]:
    """{"path"} -> {"target"}"""
    return {"target": os.readlink(arg(args, "path", str))}


def op_symlink(args: dict[str, Any], emit: Emit) -> dict[str, Any]:
    """{"target", "path"} -> {}: ``path`` becomes a symlink to ``target``."""
    os.symlink(arg(args, "target", str), arg(args, "path", str))
    return {}


def op_realpath(args: dict[str, Any], emit: Emit) -> dict[str, Any]:
    """{"path"} -> {"path"}: absolute, symlinks resolved (the last part need not exist)."""
    return {"path": os.path.realpath(arg(args, "path", str))}
