"""File operations inside a mounted volume, done by the guest that mounts it.

Every path is relative to the volume's root and is resolved in the guest one
component at a time with ``O_NOFOLLOW`` (``guest_tool.walk_to_parent``): a
symlink anywhere on the way, or ``..``, is refused rather than followed, so
no operation reaches outside the volume. The bytes themselves move with the
agent's ``read_file``/``write_file`` in ``CHUNK_BYTES`` pieces, on the path
the tool resolved; an upload goes to a temporary file next to its target and
is renamed over it at the end (a reader sees the old file or the new one).

Which guest does it is ``Volumes``' choice: the VM that has the volume
mounted, or a short-lived helper VM when none has.
"""

from __future__ import annotations

import base64
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from kiln.runtime.errors import RuntimeFailure
from kiln.volumes.errors import (
    GuestVolumeError,
    PathRefused,
    VolumeError,
    VolumeFileConflict,
    VolumeFileNotFound,
    VolumeFileTooLarge,
)
from kiln.volumes.guest import Agent, GuestVolumes

# The agent's transfer chunk (``kiln.guest.CHUNK_BYTES``): base64 of
# it fits a frame with room to spare.
CHUNK_BYTES = 256 * 1024
DEFAULT_MAX_DOWNLOAD_BYTES = 256 * 1024 * 1024
DEFAULT_LIST_LIMIT = 1000
MAX_LIST_LIMIT = 10000


class ByteSource(Protocol):
    """Where an upload's bytes come from (a FastAPI ``UploadFile`` is one)."""

    async def read(self, size: int = -1) -> bytes: ...


class BytesSource:
    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self._offset = 0

    async def read(self, size: int = -1) -> bytes:
        end = len(self._data) if size < 0 else self._offset + size
        chunk = bytes(self._data[self._offset : end])
        self._offset += len(chunk)
        return chunk


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the volume's root, no leading '/'
    size: int
    is_dir: bool
    kind: str  # "file", "dir", "symlink" or "other"
    modified_at: float


@dataclass(frozen=True)
class OpenedFile:
    path: str  # as asked, relative to the volume's root
    guest_path: str  # where the walk found it in the guest
    size: int
    max_bytes: int


def entry_from(value: dict) -> FileEntry:
    return FileEntry(
        path=str(value["path"]),
        size=int(value["size"]),
        is_dir=bool(value["is_dir"]),
        kind=str(value["kind"]),
        modified_at=float(value["modified_at"]),
    )


def translate(error: GuestVolumeError) -> VolumeError:
    """The guest's errno names, as this package's errors."""
    if error.code in ("ELOOP", "EINVAL"):
        return PathRefused(error.message)
    if error.code in ("ENOENT", "ENOTDIR"):
        return VolumeFileNotFound(error.message)
    if error.code in ("EEXIST", "EISDIR", "ENOTEMPTY"):
        return VolumeFileConflict(error.message)
    return error


class VolumeFiles:
    """The file operations on one mounted volume, through one guest."""

    def __init__(self, agent: Agent, guest: GuestVolumes, root: str) -> None:
        self._agent = agent
        self._guest = guest
        self._root = root

    async def _tool(self, op: str, **args: object) -> dict:
        try:
            return await self._guest.file_op(op, root=self._root, **args)
        except GuestVolumeError as error:
            raise translate(error) from error

    async def _agent_call(self, op: str, **args: object) -> dict:
        try:
            return await self._agent.call(op, None, **args)
        except RuntimeFailure as error:
            raise translate(
                GuestVolumeError(str(getattr(error, "code", "EAGENT")), str(error))
            ) from error

    async def stat(self, path: str) -> FileEntry:
        return entry_from(await self._tool("file_stat", path=path))

    async def list(
        self, prefix: str = "", recursive: bool = False, limit: int = DEFAULT_LIST_LIMIT
    ) -> list[FileEntry]:
        limit = max(1, min(limit, MAX_LIST_LIMIT))
        value = await self._tool(
            "file_list", prefix=prefix, recursive=recursive, limit=limit
        )
        return [entry_from(entry) for entry in value["entries"]]

    async def delete(self, path: str, recursive: bool = False) -> None:
        await self._tool("file_delete", path=path, recursive=recursive)

    async def open_read(self, path: str, max_bytes: int = DEFAULT_MAX_DOWNLOAD_BYTES) -> OpenedFile:
        """A regular file of the volume, checked (no symlink on the way, at
        most ``max_bytes``) and ready for ``chunks``."""
        opened = await self._tool("file_open_read", path=path)
        size = int(opened["size"])
        if size > max_bytes:
            raise VolumeFileTooLarge(f"{path} is {size} bytes; downloads stop at {max_bytes}")
        return OpenedFile(path, str(opened["guest_path"]), size, max_bytes)

    async def chunks(self, opened: OpenedFile) -> AsyncIterator[bytes]:
        """The file's bytes, ``CHUNK_BYTES`` at a time (one chunk held at a time)."""
        offset = 0
        while True:
            chunk = await self._agent_call(
                "read_file", path=opened.guest_path, offset=offset, length=CHUNK_BYTES
            )
            data = base64.b64decode(chunk["data"])
            offset += len(data)
            if offset > opened.max_bytes:
                raise VolumeFileTooLarge(f"{opened.path} grew past {opened.max_bytes} bytes while it was read")
            if data:
                yield data
            if chunk["eof"] or not data:
                return

    async def download(self, path: str, max_bytes: int = DEFAULT_MAX_DOWNLOAD_BYTES) -> bytes:
        opened = await self.open_read(path, max_bytes)
        return b"".join([chunk async for chunk in self.chunks(opened)])

    async def upload(
        self, path: str, source: ByteSource, overwrite: bool = False
    ) -> FileEntry:
        begun = await self._tool("file_begin_write", path=path, overwrite=overwrite)
        try:
            offset = 0
            while True:
                chunk = await source.read(CHUNK_BYTES)
                if not chunk:
                    break
                await self._agent_call(
                    "write_file",
                    path=begun["guest_path"],
                    data=base64.b64encode(chunk).decode("ascii"),
                    offset=offset,
                    truncate=False,
                )
                offset += len(chunk)
            return entry_from(
                await self._tool(
                    "file_commit_write",
                    path=path,
                    temporary=begun["temporary"],
                    overwrite=overwrite,
                )
            )
        except BaseException:
            with contextlib.suppress(VolumeError):
                await self._tool(
                    "file_abort_write", path=path, temporary=begun["temporary"]
                )
            raise
