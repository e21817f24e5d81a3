"""Moving files into and out of a session's VM (``/upload``, ``/download``).

Data crosses the agent in ``protocol.CHUNK_BYTES`` pieces (``write_file`` and
``read_file`` at an offset), never as one frame, so a file's size is bounded by
the limits below and not by the agent protocol. Relative guest paths are
relative to the image's working directory (``/app`` in the default image).

An upload writes its target in place: if the transfer breaks off, a partial
file is left behind (a retry overwrites it). A recursive upload is a tar
archive, staged in the guest's /tmp and unpacked with the guest's ``tar``.
"""

from __future__ import annotations

import base64
import contextlib
import posixpath
import secrets
from dataclasses import dataclass
from typing import Protocol

from kiln.guest import protocol
from kiln.runtime.errors import RuntimeFailure
from kiln.services.errors import Conflict, GuestRefused, InvalidRequest, NotFound, TooLarge
from kiln.services.guest import GuestTarget, agent_errors, session_target
from kiln.services.vms import VmService

# The whole file is held in memory and sent base64 in one JSON answer.
MAX_DOWNLOAD_BYTES = 256 * 1024 * 1024
TAR_STAGING_DIR = "/tmp"
# tar's stderr quoted in an error, at most.
MAX_TOOL_ERROR_CHARS = 2000


class ByteSource(Protocol):
    """Where an upload's bytes come from (a FastAPI ``UploadFile`` is one)."""

    async def read(self, size: int = -1) -> bytes: ...


@dataclass(frozen=True)
class Uploaded:
    path: str
    size: int


@dataclass(frozen=True)
class Downloaded:
    path: str
    data: bytes


def _check_path(path: str, field: str) -> None:
    if not path or "\0" in path:
        raise InvalidRequest.single((field,), "must be a non-empty path without NUL characters")


class FileService:
    def __init__(self, vms: VmService) -> None:
        self._vms = vms

    async def upload(
        self,
        owner_id: int,
        session_id: str,
        remote_path: str,
        source: ByteSource,
        recursive: bool,
    ) -> Uploaded:
        _check_path(remote_path, "remote_path")
        target = await session_target(self._vms, owner_id, session_id)
        with agent_errors(target.vm.id):
            path = await self._guest_path(target, remote_path)
            if recursive:
                return await self._upload_archive(target, path, source)
            await self._check_writable_file(target, path)
            size = await self._write(target, path, source)
        return Uploaded(path=path, size=size)

    async def download(self, owner_id: int, session_id: str, filename: str) -> Downloaded:
        _check_path(filename, "filename")
        target = await session_target(self._vms, owner_id, session_id)
        with agent_errors(target.vm.id):
            path = await self._guest_path(target, filename)
            info = await self._stat(target, path)
            if info is None:
                raise NotFound(f"no such file in the guest: {path}")
            if info["is_dir"]:
                raise Conflict(f"{path} is a directory; download files one by one")
            if info["size"] > MAX_DOWNLOAD_BYTES:
                raise TooLarge(
                    f"{path} is {info['size']} bytes; downloads are limited to "
                    f"{MAX_DOWNLOAD_BYTES} bytes"
                )
            data = bytearray()
            while True:
                chunk = await target.agent.call(
                    "read_file", path=path, offset=len(data), length=protocol.CHUNK_BYTES
                )
                data += base64.b64decode(chunk["data"])
                if chunk["eof"] or not chunk["data"]:
                    break
                if len(data) > MAX_DOWNLOAD_BYTES:  # it grew while we read it
                    raise TooLarge(f"{path} grew past {MAX_DOWNLOAD_BYTES} bytes while read")
        return Downloaded(path=path, data=bytes(data))

    # -- internals -------------------------------------------------------------------

    async def _guest_path(self, target: GuestTarget, path: str) -> str:
        if path.startswith("/"):
            return path
        ping = await target.agent.call("ping")
        return posixpath.join(ping.get("workdir") or "/", path)

    async def _stat(self, target: GuestTarget, path: str) -> dict | None:
        """The guest's stat of ``path``, or None if nothing is there."""
        try:
            with agent_errors(target.vm.id):
                return await target.agent.call("stat", path=path)
        except NotFound:
            return None

    async def _check_writable_file(self, target: GuestTarget, path: str) -> None:
        existing = await self._stat(target, path)
        if existing is not None and existing["is_dir"]:
            raise Conflict(f"{path} is a directory; give the full path of the file to write")
        parent = posixpath.dirname(path) or "/"
        parent_info = await self._stat(target, parent)
        if parent_info is None:
            raise NotFound(f"directory {parent} does not exist in the guest")
        if not parent_info["is_dir"]:
            raise Conflict(f"{parent} is not a directory")

    async def _write(self, target: GuestTarget, path: str, source: ByteSource) -> int:
        """Copy ``source`` into ``path`` chunk by chunk; returns the bytes written."""
        offset = 0
        while True:
            chunk = await source.read(protocol.CHUNK_BYTES)
            # The first write (offset 0) truncates, so an empty upload still makes the file.
            if chunk or offset == 0:
                await target.agent.call(
                    "write_file",
                    path=path,
                    data=base64.b64encode(chunk).decode("ascii"),
                    offset=offset,
                )
            offset += len(chunk)
            if not chunk:
                return offset

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
            # Best effort: a failure to clean up must not hide why the upload failed.
            with contextlib.suppress(RuntimeFailure):
                await self._run_tool(target, ["rm", "-f", "--", staged])
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
