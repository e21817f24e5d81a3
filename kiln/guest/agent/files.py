"""File ops: write_file, read_file, stat, list; and the atomic replace the
system ops use for the files they own (/etc/environment, hostname, resolv.conf,
the CA bundle)."""

from __future__ import annotations

import os
import stat
import threading
from typing import Any

from .args import arg, b64_arg
from .errors import AgentError
from .wire import Emit, Handler, b64, protocol

MAX_READ_BYTES = 8 * 1024 * 1024  # base64 of this still fits a frame


def handlers() -> dict[str, Handler]:
    return {"write_file": op_write_file, "read_file": op_read_file, "stat": op_stat, "list": op_list}


def op_write_file(args: dict[str, Any], emit: Emit) -> dict[str, Any]:
    """{"path", "data" (b64), "offset"=0, "truncate"=offset==0, "mode", "mkdirs"=false}
    -> {"size": file size after the write}"""
    path = arg(args, "path", str)
    data = b64_arg(args, "data", b"")
    offset = arg(args, "offset", int, 0)
    truncate = arg(args, "truncate", bool, offset == 0)
    mode = arg(args, "mode", int, None)
    if offset < 0:
        raise AgentError("EINVAL", "offset must be >= 0")
    if arg(args, "mkdirs", bool, False):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if os.path.isdir(path):
        raise AgentError("EISDIR", f"{path} is a directory")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644 if mode is None else mode)
    try:
        if truncate:
            os.ftruncate(fd, offset)
        view = memoryview(data)
        position = offset
        while view:
            written = os.pwrite(fd, view, position)
            view = view[written:]
            position += written
        if mode is not None:
            os.fchmod(fd, mode)  # the create mode above is filtered by the umask
        return {"size": os.fstat(fd).st_size}
    finally:
        os.close(fd)

def op_read_file(args: dict[str, Any], emit: Emit) -> dict[str, Any]:
    """{"path", "offset"=0, "length"=CHUNK_BYTES (at most 8 MiB)} -> {"data", "eof", "size"}"""
    path = arg(args, "path", str)
    offset = arg(args, "offset", int, 0)
    length = arg(args, "length", int, protocol.CHUNK_BYTES)
    if offset < 0 or length < 0:
        raise AgentError("EINVAL", "offset and length must be >= 0")
    if os.path.isdir(path):
        raise AgentError("EISDIR", f"{path} is a directory")
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        data = os.pread(file.fileno(), min(length, MAX_READ_BYTES), offset)
    return {"data": b64(data), "eof": offset + len(data) >= size, "size": size}

def attributes(info: os.stat_result) -> dict[str, Any]:
    """What SFTP clients show of a file: its whole ``st_mode`` (type and permissions),
    owner, size and times."""
    return {
        "st_mode": info.st_mode,
        "size": info.st_size,
        "uid": info.st_uid,
        "gid": info.st_gid,
        "atime": info.st_atime,
        "mtime": info.st_mtime,
    }


def op_stat(args: dict[str, Any], emit: Emit) -> dict[str, Any]:
    """{"path", "follow"=true} -> {"path", "size", "is_dir", "mode" (permission bits),
    "mtime", "is_link", "st_mode", "uid", "gid", "atime"}; without follow, a
    symlink is described itself (lstat)."""
    path = arg(args, "path", str)
    info = os.stat(path) if arg(args, "follow", bool, True) else os.lstat(path)
    return {
        **attributes(info),
        "path": path,
        "is_dir": stat.S_ISDIR(info.st_mode),
        "is_link": stat.S_ISLNK(info.st_mode),
        "mode": stat.S_IMODE(info.st_mode),
    }

def op_list(args: dict[str, Any], emit: Emit) -> dict[str, Any]:
    """{"path", "recursive"=false, "limit"=1000} -> {"entries": [...], "truncated"}

    A recursive listing goes breadth-first (the limit keeps the shallowest
    entries) and does not follow symlinks; the result is sorted by path."""
    root = arg(args, "path", str)
    recursive = arg(args, "recursive", bool, False)
    limit = arg(args, "limit", int, 1000)
    if not os.path.isdir(root):
        os.stat(root)  # ENOENT when it is missing
        raise AgentError("ENOTDIR", f"{root} is not a directory")
    entries: list[dict] = []
    pending = [root]
    while pending and len(entries) <= limit:
        directory = pending.pop(0)
        try:
            with os.scandir(directory) as iterator:
                children = sorted(iterator, key=lambda entry: entry.name)
        except OSError:
            if directory == root:
                raise
            continue  # an unreadable subdirectory does not spoil the listing
        for entry in children:
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            is_dir = stat.S_ISDIR(info.st_mode)
            entries.append(
                {"path": entry.path, "size": info.st_size, "is_dir": is_dir, "mtime": info.st_mtime}
            )
            if recursive and is_dir:
                pending.append(entry.path)
    kept = sorted(entries[:limit], key=lambda entry: entry["path"])
    return {"entries": kept, "truncated": len(entries) > limit}



def write_atomically(path: str, content: str | bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``content`` in one step: a reader sees the old file
    or the new one. A symlink at ``path`` is replaced, not written through."""
    data = content.encode("utf-8") if isinstance(content, str) else content
    # Unique per thread: two ops replacing one file must not share a temporary.
    temporary = f"{path}.kiln-tmp-{os.getpid()}-{threading.get_ident()}"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fchmod(fd, mode)  # the create mode is filtered by the umask
    except BaseException:
        os.close(fd)
        os.unlink(temporary)
        raise
    os.close(fd)
    os.replace(temporary, path)
