"""SFTP (and, through asyncssh, scp in both its modes) served from the guest's
file system, over the agent's file ops.

asyncssh handles one SFTP request at a time, so bytes move in large pieces:
writes are gathered into ``TRANSFER_BYTES`` runs and written behind (at most
``WRITES_IN_FLIGHT`` at once, errors reported on the next call or the close);
reads fetch ``TRANSFER_BYTES`` and the next piece ahead. Relative paths are
relative to the image's working directory (as for ``/upload``), where a
session starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import posixpath
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncssh
from asyncssh.constants import (
    FXF_CREAT,
    FXF_EXCL,
    FXF_TRUNC,
    FXF_WRITE,
)

from kiln.sshd.relay import GuestError, GuestLink, b64, unb64

TRANSFER_BYTES = 1024 * 1024
WRITES_IN_FLIGHT = 2
LIST_PAGE = 1000

# Agent error codes as SFTP errors (asyncssh sends each as the status the
# client's protocol version knows, FX_FAILURE for the ones v3 lacks).
ERRORS: dict[str, Callable[[str], asyncssh.SFTPError]] = {
    "ENOENT": asyncssh.SFTPNoSuchFile,
    "ENOTDIR": asyncssh.SFTPNoSuchFile,
    "EACCES": asyncssh.SFTPPermissionDenied,
    "EEXIST": asyncssh.SFTPFileAlreadyExists,
    "ENOTEMPTY": asyncssh.SFTPDirNotEmpty,
    "EISDIR": asyncssh.SFTPFileIsADirectory,
    "ENOSPC": asyncssh.SFTPNoSpaceOnFilesystem,
    "ELOOP": asyncssh.SFTPLinkLoop,
    "EUNKNOWNOP": asyncssh.SFTPOpUnsupported,
}

LinkSource = Callable[[], Awaitable[GuestLink]]


def sftp_error(error: GuestError) -> asyncssh.SFTPError:
    make = ERRORS.get(error.code, asyncssh.SFTPFailure)
    return make(error.message or error.code)


def attrs_of(info: dict[str, Any]) -> asyncssh.SFTPAttrs:
    mode = int(info.get("st_mode") or 0)
    return asyncssh.SFTPAttrs(
        type=_filetype(mode),
        size=info.get("size"),
        uid=info.get("uid"),
        gid=info.get("gid"),
        permissions=mode,
        atime=int(info.get("atime") or 0),
        mtime=int(info.get("mtime") or 0),
    )


def _filetype(mode: int) -> int:
    from asyncssh.constants import (
        FILEXFER_TYPE_DIRECTORY,
        FILEXFER_TYPE_REGULAR,
        FILEXFER_TYPE_SPECIAL,
        FILEXFER_TYPE_SYMLINK,
    )

    if stat.S_ISDIR(mode):
        return FILEXFER_TYPE_DIRECTORY
    if stat.S_ISLNK(mode):
        return FILEXFER_TYPE_SYMLINK
    if stat.S_ISREG(mode):
        return FILEXFER_TYPE_REGULAR
    return FILEXFER_TYPE_SPECIAL


class GuestFile:
    """An open file of the guest: writes gathered and written behind, reads ahead."""

    def __init__(self, link: GuestLink, path: str, end: int) -> None:
        self.link = link
        self.path = path
        self.end = end  # where an append writes
        self._run = bytearray()
        self._run_start = 0
        self._writes: set[asyncio.Task[None]] = set()
        self._failure: GuestError | None = None
        self._cached: tuple[int, bytes, bool] | None = None  # offset, data, at end of file
        self._ahead: tuple[int, asyncio.Task[tuple[bytes, bool]]] | None = None
        self._lock = asyncio.Lock()

    async def write(self, offset: int, data: bytes) -> int:
        async with self._lock:
            self._check()
            self._cached = None
            if self._run and offset != self._run_start + len(self._run):
                await self._write_behind()
            if not self._run:
                self._run_start = offset
            self._run += data
            self.end = max(self.end, offset + len(data))
            if len(self._run) >= TRANSFER_BYTES:
                await self._write_behind()
            return len(data)

    async def _write_behind(self) -> None:
        data, start = bytes(self._run), self._run_start
        self._run = bytearray()
        while len(self._writes) >= WRITES_IN_FLIGHT:
            await asyncio.wait(self._writes, return_when=asyncio.FIRST_COMPLETED)
        task = asyncio.create_task(self._write_piece(start, data))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write_piece(self, offset: int, data: bytes) -> None:
        try:
            await self.link.call("write_file", path=self.path, data=b64(data), offset=offset, truncate=False)
        except GuestError as error:
            self._failure = self._failure or error

    def _check(self) -> None:
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise sftp_error(failure)

    async def flush(self) -> None:
        if self._run:
            await self._write_behind()
        if self._writes:
            await asyncio.wait(set(self._writes))
        self._check()

    async def read(self, offset: int, size: int) -> bytes:
        async with self._lock:
            if self._run or self._writes:
                await self.flush()
            data = bytearray()
            while len(data) < size:
                piece, at_end = await self._piece(offset + len(data))
                data += piece[: size - len(data)]
                if at_end or not piece:
                    break
            return bytes(data)

    async def _piece(self, offset: int) -> tuple[memoryview, bool]:
        """The cached bytes from ``offset`` on (a view: clients read 32 KiB at a
        time out of each piece), fetching and reading ahead as needed."""
        cached = self._cached
        if cached is not None and cached[0] <= offset < cached[0] + len(cached[1]):
            start = offset - cached[0]
            return memoryview(cached[1])[start:], cached[2]
        if cached is not None and cached[2] and offset >= cached[0] + len(cached[1]):
            return memoryview(b""), True
        if self._ahead is not None and self._ahead[0] == offset:
            data, at_end = await self._ahead[1]
        else:
            self._drop_ahead()
            data, at_end = await self._fetch(offset)
        self._cached = (offset, data, at_end)
        self._ahead = None
        if not at_end:
            after = offset + len(data)
            self._ahead = (after, asyncio.create_task(self._fetch(after)))
        return memoryview(data), at_end

    async def _fetch(self, offset: int) -> tuple[bytes, bool]:
        try:
            answer = await self.link.call("read_file", path=self.path, offset=offset, length=TRANSFER_BYTES)
        except GuestError as error:
            raise sftp_error(error) from None
        return unb64(answer), bool(answer.get("eof"))

    def _drop_ahead(self) -> None:
        if self._ahead is not None:
            self._ahead[1].cancel()
            self._ahead = None

    async def close(self) -> None:
        self._drop_ahead()
        async with self._lock:
            await self.flush()


class GuestSFTPServer(asyncssh.SFTPServer):
    """One SFTP (or scp) session; ``link`` gives the connection's guest link."""

    def __init__(self, chan: asyncssh.SSHServerChannel, link: LinkSource) -> None:
        super().__init__(chan)
        self._link_source = link

    async def _link(self) -> GuestLink:
        try:
            return await self._link_source()
        except GuestError as error:
            raise sftp_error(error) from None

    async def _call(self, op: str, **args: Any) -> dict[str, Any]:
        link = await self._link()
        try:
            return await link.call(op, **args)
        except GuestError as error:
            raise sftp_error(error) from None

    async def _path(self, path: bytes) -> str:
        text = path.decode("utf-8", "surrogateescape")
        if not text.startswith("/"):
            text = posixpath.join((await self._link()).workdir, text)
        return posixpath.normpath(text) if text != "/" else "/"

    def exit(self) -> None:
        """The SFTP subsystem ended: say so with status 0, as OpenSSH's sftp-server's
        exit does (scp in SFTP mode fails without it). scp sessions set their own."""
        if self.channel.get_subsystem():
            with contextlib.suppress(OSError, asyncssh.Error):
                self.channel.exit(0)

    def format_user(self, uid: int | None) -> str:
        return "root" if uid == 0 else str(uid if uid is not None else "")

    def format_group(self, gid: int | None) -> str:
        return "root" if gid == 0 else str(gid if gid is not None else "")

    async def realpath(self, path: bytes) -> bytes:
        resolved = await self._call("realpath", path=await self._path(path))
        return str(resolved["path"]).encode("utf-8", "surrogateescape")

    async def stat(self, path: bytes) -> asyncssh.SFTPAttrs:
        return attrs_of(await self._call("stat", path=await self._path(path)))

    async def lstat(self, path: bytes) -> asyncssh.SFTPAttrs:
        return attrs_of(await self._call("stat", path=await self._path(path), follow=False))

    async def open(self, path: bytes, pflags: int, attrs: asyncssh.SFTPAttrs) -> GuestFile:
        guest_path = await self._path(path)
        link = await self._link()
        try:
            info: dict[str, Any] | None = await link.call("stat", path=guest_path)
        except GuestError as error:
            if error.code != "ENOENT":
                raise sftp_error(error) from None
            info = None
        if info is not None and info.get("is_dir"):
            raise asyncssh.SFTPFileIsADirectory(f"{guest_path} is a directory")
        if info is not None and pflags & FXF_CREAT and pflags & FXF_EXCL:
            raise asyncssh.SFTPFileAlreadyExists(f"{guest_path} exists")
        if info is None and not pflags & FXF_CREAT:
            raise asyncssh.SFTPNoSuchFile(f"{guest_path}: no such file")
        size = int(info["size"]) if info is not None else 0
        if pflags & FXF_WRITE and (info is None or pflags & FXF_TRUNC):
            mode = (attrs.permissions & 0o7777) if attrs.permissions is not None else None
            try:
                await link.call("write_file", path=guest_path, data="", offset=0, truncate=True, mode=mode)
            except GuestError as error:
                raise sftp_error(error) from None
            size = 0
        return GuestFile(link, guest_path, size)

    async def read(self, file_obj: object, offset: int, size: int) -> bytes:
        assert isinstance(file_obj, GuestFile)
        return await file_obj.read(offset, size)

    async def write(self, file_obj: object, offset: int, data: bytes) -> int:
        assert isinstance(file_obj, GuestFile)
        return await file_obj.write(offset, data)

    async def close(self, file_obj: object) -> None:
        assert isinstance(file_obj, GuestFile)
        await file_obj.close()

    async def fstat(self, file_obj: object) -> asyncssh.SFTPAttrs:
        assert isinstance(file_obj, GuestFile)
        await file_obj.flush()
        return attrs_of(await self._call("stat", path=file_obj.path))

    async def setstat(self, path: bytes, attrs: asyncssh.SFTPAttrs) -> None:
        await self._set_attrs(await self._path(path), attrs)

    async def fsetstat(self, file_obj: object, attrs: asyncssh.SFTPAttrs) -> None:
        assert isinstance(file_obj, GuestFile)
        await file_obj.flush()
        await self._set_attrs(file_obj.path, attrs)

    async def _set_attrs(self, path: str, attrs: asyncssh.SFTPAttrs) -> None:
        change: dict[str, Any] = {}
        if attrs.permissions is not None:
            change["mode"] = attrs.permissions & 0o7777
        if attrs.uid is not None:
            change["uid"] = attrs.uid
        if attrs.gid is not None:
            change["gid"] = attrs.gid
        if attrs.atime is not None and attrs.mtime is not None:
            change["atime"], change["mtime"] = attrs.atime, attrs.mtime
        if attrs.size is not None:
            change["size"] = attrs.size
        if change:
            await self._call("set_attrs", path=path, **change)

    async def scandir(self, path: bytes) -> AsyncIterator[asyncssh.SFTPName]:
        directory = await self._path(path)
        for name in (".", ".."):
            with contextlib.suppress(asyncssh.SFTPError):
                info = await self._call("stat", path=posixpath.join(directory, name))
                yield asyncssh.SFTPName(name.encode(), attrs=attrs_of(info))
        offset = 0
        while True:
            page = await self._call("list_dir", path=directory, offset=offset, limit=LIST_PAGE)
            for entry in page["entries"]:
                yield asyncssh.SFTPName(str(entry["name"]).encode("utf-8", "surrogateescape"), attrs=attrs_of(entry))
            offset += LIST_PAGE
            if page.get("done"):
                return

    async def remove(self, path: bytes) -> None:
        await self._call("remove", path=await self._path(path))

    async def mkdir(self, path: bytes, attrs: asyncssh.SFTPAttrs) -> None:
        mode = (attrs.permissions & 0o7777) if attrs.permissions is not None else 0o755
        await self._call("mkdir", path=await self._path(path), mode=mode)

    async def rmdir(self, path: bytes) -> None:
        await self._call("rmdir", path=await self._path(path))

    async def rename(self, oldpath: bytes, newpath: bytes) -> None:
        await self._call("rename", old=await self._path(oldpath), new=await self._path(newpath))

    async def posix_rename(self, oldpath: bytes, newpath: bytes) -> None:
        await self._call("rename", old=await self._path(oldpath), new=await self._path(newpath), overwrite=True)

    async def readlink(self, path: bytes) -> bytes:
        answer = await self._call("readlink", path=await self._path(path))
        return str(answer["target"]).encode("utf-8", "surrogateescape")

    async def symlink(self, oldpath: bytes, newpath: bytes) -> None:
        # OpenSSH's clients send (target, link) in this order too.
        target = oldpath.decode("utf-8", "surrogateescape")
        await self._call("symlink", target=target, path=await self._path(newpath))
