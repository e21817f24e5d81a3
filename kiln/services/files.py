"""Moving files into and out of a session's VM (``/upload``, ``/download``).

Data crosses the agent in ``protocol.CHUNK_BYTES`` pieces (``write_file`` and
``read_file`` at an offset), never as one frame, so a file's size is bounded by
the limits below and not by the agent protocol. Relative guest paths are
relative to the image's working directory (``/app`` in the default image).

An upload (at most ``max_upload_bytes``) is written under a temporary name
beside its target (``.<name>.kiln-upload-<random>``, with the mode of the file
it replaces) and moved into place with ``mv -f`` only once it is complete; if
the transfer fails or is cut, the temporary file is removed (best effort: a
guest whose agent died keeps it), so the target is never left half-written.
Replacing makes a new file: a symlink at the target is replaced, not followed.
A recursive upload is a tar archive, staged in the guest's /tmp and unpacked
with the guest's ``tar``.

A download (at most ``max_download_bytes``) is streamed: ``Download.chunks``
reads the guest file chunk by chunk while the answer is being sent, so the
server holds one chunk at a time, never the file.
"""

from __future__ import annotations

import base64
import contextlib
import posixpath
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from kiln.guest import protocol
from kiln.runtime.errors import RuntimeFailure
from kiln.services.errors import (
    Conflict,
    GuestRefused,
    InvalidRequest,
    NotFound,
    ServiceError,
    TooLarge,
)
from kiln.services.guest import GuestTarget, agent_errors, session_target
from kiln.services.vms import VmService

DEFAULT_MAX_UPLOAD_BYTES = 1024**3
DEFAULT_MAX_DOWNLOAD_BYTES = 1024**3
TAR_STAGING_DIR = "/tmp"
# tar's stderr quoted in an error, at most.
MAX_TOOL_ERROR_CHARS = 2000
UPLOAD_SUFFIX = ".kiln-upload-"
# A file name is at most 255 bytes; the temporary name adds a dot and the suffix.
MAX_KEPT_NAME_CHARS = 200
# Entries of one directory listing, at most.
MAX_LISTED = 1000


class ByteSource(Protocol):
    """Where an upload's bytes come from (a FastAPI ``UploadFile`` is one)."""

    async def read(self, size: int = -1) -> bytes: ...


@dataclass(frozen=True)
class Uploaded:
    path: str
    size: int


@dataclass(frozen=True)
class Listing:
    path: str  # the directory, absolute
    entries: list[dict]  # {"path", "size", "is_dir", "mtime"}, sorted by name
    truncated: bool


@dataclass
class Download:
    """A guest file being read: ``chunks()`` yields its bytes, the first chunk
    already read (so that an unreadable file is an error before the answer starts)."""

    path: str
    target: GuestTarget
    first: bytes
    at_end: bool
    limit: int
    size: int = 0  # bytes yielded so far; the file's size once ``chunks`` is done

    async def chunks(self) -> AsyncIterator[bytes]:
        """The file's bytes. Past ``limit`` (the file grew while read) or when the
        guest fails midway it raises: the answer is then cut, never short."""
        offset = len(self.first)
        self.size = offset
        if self.first:
            yield self.first
        at_end = self.at_end
        while not at_end:
            with agent_errors(self.target):
                chunk = await self.target.agent.call(
                    "read_file", path=self.path, offset=offset, length=protocol.CHUNK_BYTES
                )
            data = base64.b64decode(chunk["data"])
            at_end = bool(chunk["eof"]) or not data
            offset += len(data)
            if offset > self.limit:
                raise TooLarge(f"{self.path} grew past {self.limit} bytes while read")
            self.size = offset
            if data:
                yield data


def upload_name(path: str) -> str:
    """The temporary name an upload to ``path`` is written under, beside it."""
    parent, name = posixpath.split(path)
    return posixpath.join(parent, f".{name[:MAX_KEPT_NAME_CHARS]}{UPLOAD_SUFFIX}{secrets.token_hex(6)}")


def _check_path(path: str, field: str) -> None:
    if not path or "\0" in path:
        raise InvalidRequest.single((field,), "must be a non-empty path without NUL characters")


class FileService:
    def __init__(
        self,
        vms: VmService,
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
        max_download_bytes: int = DEFAULT_MAX_DOWNLOAD_BYTES,
    ) -> None:
        self._vms = vms
        self.max_upload_bytes = max_upload_bytes
        self.max_download_bytes = max_download_bytes

    async def upload(
        self,
        owner_id: int,
        session_id: str,
        remote_path: str,
        source: ByteSource,
        recursive: bool,
    ) -> Uploaded:
        _check_path(remote_path, "remote_path")
        self._check_upload_size(getattr(source, "size", None))
        target = await session_target(self._vms, owner_id, session_id)
        with agent_errors(target):
            path = await self._guest_path(target, remote_path)
            if recursive:
                return await self._upload_archive(target, path, source)
            existing = await self._check_writable_file(target, path)
            mode = existing["mode"] if existing is not None else None
            size = await self._write_then_move(target, path, source, mode)
        return Uploaded(path=path, size=size)

    async def download(self, owner_id: int, session_id: str, filename: str) -> Download:
        """A download of ``filename``, checked (404, 409, 413) and its first chunk read."""
        _check_path(filename, "filename")
        target = await session_target(self._vms, owner_id, session_id)
        with agent_errors(target):
            path = await self._guest_path(target, filename)
            info = await self._stat(target, path)
            if info is None:
                raise NotFound(f"no such file in the guest: {path}")
            if info["is_dir"]:
                raise Conflict(f"{path} is a directory; download files one by one")
            if info["size"] > self.max_download_bytes:
                raise TooLarge(
                    f"{path} is {info['size']} bytes; downloads are limited to "
                    f"{self.max_download_bytes} bytes"
                )
            chunk = await target.agent.call("read_file", path=path, offset=0, length=protocol.CHUNK_BYTES)
        first = base64.b64decode(chunk["data"])
        return Download(path, target, first, bool(chunk["eof"]) or not first, self.max_download_bytes)

    async def list_dir(self, owner_id: int, session_id: str, path: str) -> Listing:
        """One directory's entries (not recursive; at most ``MAX_LISTED`` of them)."""
        _check_path(path, "path")
        target = await session_target(self._vms, owner_id, session_id)
        with agent_errors(target):
            directory = await self._guest_path(target, path)
            found = await target.agent.call("list", path=directory, limit=MAX_LISTED)
        return Listing(directory, found["entries"][:MAX_LISTED], bool(found["truncated"]))

    def _check_upload_size(self, size: int | None) -> None:
        if size is not None and size > self.max_upload_bytes:
            raise TooLarge(
                f"the upload is {size} bytes; uploads are limited to {self.max_upload_bytes} bytes"
            )

    # -- internals -------------------------------------------------------------------

    async def _guest_path(self, target: GuestTarget, path: str) -> str:
        if path.startswith("/"):
            return path
        ping = await target.agent.call("ping")
        return posixpath.join(ping.get("workdir") or "/", path)

    async def _stat(self, target: GuestTarget, path: str) -> dict | None:
        """The guest's stat of ``path``, or None if nothing is there."""
        try:
            with agent_errors(target):
                return await target.agent.call("stat", path=path)
        except NotFound:
            return None

    async def _check_writable_file(self, target: GuestTarget, path: str) -> dict | None:
        """The stat of the file at ``path`` (None if there is none), if one may be written there."""
        existing = await self._stat(target, path)
        if existing is not None and existing["is_dir"]:
            raise Conflict(f"{path} is a directory; give the full path of the file to write")
        parent = posixpath.dirname(path) or "/"
        parent_info = await self._stat(target, parent)
        if parent_info is None:
            raise NotFound(f"directory {parent} does not exist in the guest")
        if not parent_info["is_dir"]:
            raise Conflict(f"{parent} is not a directory")
        return existing

    async def _write_then_move(
        self, target: GuestTarget, path: str, source: ByteSource, mode: int | None
    ) -> int:
        """Write ``source`` beside ``path`` and move it there once complete."""
        temporary = upload_name(path)
        moved = False
        try:
            size = await self._write(target, temporary, source, mode)
            exit_code, errors = await self._run_tool(
                target, ["/bin/sh", "-c", 'exec mv -f -- "$1" "$2"', "move", temporary, path]
            )
            if exit_code != 0:
                raise GuestRefused(
                    f"could not move the upload into {path}: "
                    f"{errors[-MAX_TOOL_ERROR_CHARS:].strip() or f'mv exited with {exit_code}'}"
                )
            moved = True
            return size
        finally:
            if not moved:
                await self._remove_quietly(target, temporary)

    async def _write(
        self, target: GuestTarget, path: str, source: ByteSource, mode: int | None = None
    ) -> int:
        """Copy ``source`` into ``path`` chunk by chunk; returns the bytes written.
        TooLarge once more than ``max_upload_bytes`` came (a source of unknown size)."""
        offset = 0
        while True:
            chunk = await source.read(protocol.CHUNK_BYTES)
            self._check_upload_size(offset + len(chunk))
            # The first write (offset 0) truncates, so an empty upload still makes the file.
            if chunk or offset == 0:
                await target.agent.call(
                    "write_file",
                    path=path,
                    data=base64.b64encode(chunk).decode("ascii"),
                    offset=offset,
                    **({"mode": mode} if mode is not None and offset == 0 else {}),
                )
            offset += len(chunk)
            if not chunk:
                return offset

    async def _remove_quietly(self, target: GuestTarget, path: str) -> None:
        # Best effort: a failure to clean up must not hide why the upload failed.
        with contextlib.suppress(RuntimeFailure, ServiceError), agent_errors(target):
            await self._run_tool(target, ["rm", "-f", "--", path])

    async def _upload_archive(
        self, target: GuestTarget, directory: str, source: ByteSource
    ) -> Uploaded:
        existing = await self._stat(target, directory)
        if existing is not None and not existing["is_dir"]:
            raise Conflict(f"{directory} exists and is not a directory")
        staged = f"{TAR_STAGING_DIR}/kiln-upload-{secrets.token_hex(8)}.tar"
        try:
            size = await self._write(target, staged, source)
            exit_code, errors = await self._run_tool(
                target,
                # $1 and $2 keep the paths out of the shell's parsing.
                ["/bin/sh", "-c", 'mkdir -p -- "$1" && tar -x --no-same-owner -f "$2" -C "$1"',
                 "unpack", directory, staged],
            )
        finally:
            await self._remove_quietly(target, staged)
        if exit_code != 0:
            raise GuestRefused(
                f"could not unpack the archive into {directory}: "
                f"{errors[-MAX_TOOL_ERROR_CHARS:].strip() or f'tar exited with {exit_code}'}"
            )
        return Uploaded(path=directory, size=size)

    async def _run_tool(self, target: GuestTarget, argv: list[str]) -> tuple[int, str]:
        """Run a short guest command; returns its exit code and stderr."""
        errors = bytearray()
        exit_code = -1
        async for frame in target.agent.stream("exec", argv=argv, timeout=120):
            if frame.get("kind") == protocol.KIND_STDERR:
                errors += base64.b64decode(frame["data"])
            elif frame.get("kind") == protocol.KIND_RESULT:
                exit_code = int(frame["value"]["exit_code"])
        return exit_code, errors.decode("utf-8", errors="replace")
