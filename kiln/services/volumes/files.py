"""The files of a volume, mounted or not (``/v1/volumes/{id}/files``).

Where the work happens is the mechanism's choice (``kiln.volumes``): through
the VM that mounts the volume rw (or ro, for reads), or a helper VM when no VM
has it; never on the host's own kernel, never two writers on one filesystem,
never following a symlink or ``..`` out of the volume (400). Uploads (at most
``KILN_MAX_UPLOAD_BYTES``) go to a temporary file beside the target, renamed
over it at the end; a download (at most ``KILN_MAX_DOWNLOAD_BYTES``) is
streamed chunk by chunk while the volume's lock is held, so the file cannot
change under it from the host's side.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from kiln.node.node import Node
from kiln.services.errors import InvalidRequest, NotFound, TooLarge, Unsupported
from kiln.services.volumes.errors import volume_errors
from kiln.store.db import Database
from kiln.store.volume_repositories import VolumeRepository
from kiln.volumes import FileEntry, Volumes
from kiln.volumes.files import ByteSource, OpenedFile, VolumeFiles

DEFAULT_LIST_LIMIT = 1000
MAX_LIST_LIMIT = 10000


class LimitedSource:
    """An upload's bytes, refused past ``limit`` (a body of unknown size)."""

    def __init__(self, source: ByteSource, limit: int) -> None:
        self._source = source
        self._limit = limit
        self.count = 0

    async def read(self, size: int = -1) -> bytes:
        chunk = await self._source.read(size)
        self.count += len(chunk)
        if self.count > self._limit:
            raise TooLarge(f"the upload is larger than {self._limit} bytes, the most this server accepts")
        return chunk


@dataclass
class VolumeDownload:
    """A volume file being read; ``chunks()`` yields it and then lets the volume go."""

    path: str
    size: int
    _files: VolumeFiles
    _opened: OpenedFile
    _stack: contextlib.AsyncExitStack

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            with volume_errors():
                async for chunk in self._files.chunks(self._opened):
                    yield chunk
        finally:
            await self._stack.aclose()

    async def close(self) -> None:
        await self._stack.aclose()


def _check_path(path: str, field: str, *, root_allowed: bool = False) -> None:
    if "\0" in path or (not root_allowed and not path.strip("/")):
        raise InvalidRequest.single((field,), "must name a file inside the volume (no NUL characters)")


class VolumeFileService:
    def __init__(self, db: Database, node: Node, max_upload_bytes: int, max_download_bytes: int) -> None:
        self._db = db
        self._node = node
        self.max_upload_bytes = max_upload_bytes
        self.max_download_bytes = max_download_bytes

    async def upload(
        self, owner_id: int, volume_id: str, path: str, source: ByteSource, overwrite: bool, size: int | None
    ) -> FileEntry:
        _check_path(path, "path")
        if size is not None and size > self.max_upload_bytes:
            raise TooLarge(f"the upload is {size} bytes; uploads are limited to {self.max_upload_bytes} bytes")
        volumes = await self._volumes(owner_id, volume_id)
        with volume_errors():
            return await volumes.upload(
                volume_id, path, LimitedSource(source, self.max_upload_bytes), overwrite=overwrite
            )

    async def download(self, owner_id: int, volume_id: str, path: str) -> VolumeDownload:
        """The file, checked (404, 409 for a directory, 413) before the answer starts."""
        _check_path(path, "path")
        volumes = await self._volumes(owner_id, volume_id)
        stack = contextlib.AsyncExitStack()
        try:
            with volume_errors():
                files = await stack.enter_async_context(volumes.files(volume_id, write=False))
                opened = await files.open_read(path, self.max_download_bytes)
        except BaseException:
            await stack.aclose()
            raise
        return VolumeDownload(path, opened.size, files, opened, stack)

    async def list(
        self, owner_id: int, volume_id: str, prefix: str, recursive: bool, limit: int
    ) -> list[FileEntry]:
        _check_path(prefix, "prefix", root_allowed=True)
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise InvalidRequest.single(("limit",), f"must be between 1 and {MAX_LIST_LIMIT}")
        volumes = await self._volumes(owner_id, volume_id)
        with volume_errors():
            return await volumes.list_files(volume_id, prefix, recursive, limit)

    async def delete(self, owner_id: int, volume_id: str, path: str, recursive: bool) -> None:
        _check_path(path, "path")
        volumes = await self._volumes(owner_id, volume_id)
        with volume_errors():
            await volumes.delete_file(volume_id, path, recursive=recursive)

    async def _volumes(self, owner_id: int, volume_id: str) -> Volumes:
        async with self._db.transaction() as session:
            volume = await VolumeRepository(session).get(owner_id, volume_id)
        if volume is None:
            raise NotFound(f"volume {volume_id} not found")
        if self._node.volumes is None:
            raise Unsupported("volumes are not available on this server")
        return self._node.volumes.volumes
