"""Unpacking an image's layers onto a tree (image-spec ``layer.md``).

``unpack`` opens every layer blob once, verifies its digest, rewinds it and
applies the layers in order from those same open files (``apply_layer``):

- media types: plain tar, gzip and zstd (``zstd`` tool, reading the open blob
  as its stdin), OCI and Docker names;
- whiteouts: ``.wh.<name>`` deletes ``<name>`` of the layers below;
  ``.wh..wh..opq`` hides everything the layers below put in its directory;
- an entry replaces what is at its path (a file never writes through an old
  file, hard link or symlink: the old one is unlinked first);
- nothing is written outside the tree: entries (and hard link targets) with
  ``..`` are left out, and every path is resolved as the guest would
  (``tree.resolve_in_root``), with symlinks taken relative to the tree;
- nothing that grants privileges is kept: setuid and setgid bits are cleared,
  device nodes are never made (a guest's ``/dev`` is a devtmpfs anyway), and of
  the extended attributes only ``user.*`` ones are set (never
  ``security.capability``, ACLs or ``trusted.*``). FIFOs are kept; ownership is
  kept as root. The tree belongs in a ``layout.private_dir``;
- bounded: ``UnpackLimits`` caps the bytes of file content and the number of
  entries, and tar metadata headers (PAX, GNU long names) are capped before
  they are read into memory (``BoundedTarInfo``).
"""

from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import stat
import subprocess
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from kiln.runtime.oci.layout import (
    COPY_CHUNK_BYTES,
    LAYER_MEDIA_TYPES,
    OciError,
    OciImage,
    open_blob,
    verify_open_blob,
)
from kiln.runtime.oci.tree import (
    ensure_directory,
    entry_path,
    remove_path,
    resolve_in_root,
)

WHITEOUT_PREFIX = ".wh."
OPAQUE_WHITEOUT = ".wh..wh..opq"
# PAX headers and GNU long names are read whole into memory by tarfile.
MAX_TAR_METADATA_BYTES = 1024 * 1024
# Mode bits an unpacked entry may keep: everything but setuid and setgid.
KEPT_MODE_BITS = 0o1777
# Extended attributes copied from PAX headers: only these grant nothing.
KEPT_XATTR_PREFIX = "user."


@dataclass
class UnpackReport:
    entries: int = 0
    whiteouts: int = 0
    members: int = 0  # every tar entry read, whiteouts and skipped ones included
    unpacked_bytes: int = 0  # file content written
    skipped_devices: list[str] = field(default_factory=list)
    skipped_other: list[str] = field(default_factory=list)
    cleared_setid: list[str] = field(default_factory=list)
    skipped_unsafe: list[str] = field(default_factory=list)  # names, hard link targets climbing out


@dataclass(frozen=True)
class UnpackLimits:
    """What one image may unpack to (``KILN_OCI_MAX_UNPACKED_BYTES``, ``KILN_OCI_MAX_ENTRIES``)."""

    max_bytes: int = 16 * 1024**3
    max_entries: int = 1_000_000

    def count(self, report: UnpackReport, member: tarfile.TarInfo) -> None:
        """Count ``member`` into ``report``; OciError once a cap is passed."""
        report.members += 1
        if report.members > self.max_entries:
            raise OciError(f"the image has more than {self.max_entries} entries (this server's limit)")
        if member.isreg():
            report.unpacked_bytes += member.size
            if report.unpacked_bytes > self.max_bytes:
                raise OciError(
                    f"the image unpacks to more than {self.max_bytes} bytes (this server's limit)"
                )


METADATA_TYPES = (
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
)


class BoundedTarInfo(tarfile.TarInfo):
    """A TarInfo that refuses a metadata header (PAX, GNU long name) too large to
    read: tarfile reads these whole into memory, so a layer could claim gigabytes."""

    def _proc_member(self, tarfile: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in METADATA_TYPES and self.size > MAX_TAR_METADATA_BYTES:
            raise OciError(
                f"a tar metadata header of {self.size} bytes (at most {MAX_TAR_METADATA_BYTES} are read)"
            )
        return super()._proc_member(tarfile)  # type: ignore[misc]


@contextlib.contextmanager
def decompressed(blob: IO[bytes], compression: str) -> Iterator[IO[bytes]]:
    """The uncompressed tar stream of an open layer blob (read from where it is)."""
    if compression == "none":
        yield blob
    elif compression == "gzip":
        with gzip.GzipFile(fileobj=blob, mode="rb") as stream:
            yield stream  # type: ignore[misc]
    elif compression == "zstd":
        zstd = shutil.which("zstd")
        if zstd is None:
            raise OciError("a layer is zstd-compressed and this server has no zstd tool")
        # The tool reads the open blob itself (its stdin), not the blob's path.
        process = subprocess.Popen(
            [zstd, "-d", "-c", "-q"], stdin=blob, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        try:
            assert process.stdout is not None
            yield process.stdout
            while process.stdout.read(COPY_CHUNK_BYTES):
                pass  # the end of the stream that tar did not need
        finally:
            process.stdout.close()  # type: ignore[union-attr]
            code = process.wait()
            error = process.stderr.read().decode(errors="replace").strip()  # type: ignore[union-attr]
            process.stderr.close()  # type: ignore[union-attr]
        if code != 0:
            raise OciError(f"a zstd layer could not be decompressed: {error or f'exit {code}'}")
    else:
        raise OciError(f"unsupported layer compression {compression!r}")


def unpack(image: OciImage, target: Path, limits: UnpackLimits | None = None) -> UnpackReport:
    """Verify every layer's digest, then apply the layers in order onto ``target``
    (an existing, empty directory, best inside a ``private_dir``). Each layer is
    opened once: the open file that was hashed is the one unpacked."""
    limits = limits or UnpackLimits()
    report = UnpackReport()
    directories: dict[str, tuple[int, int, int, float]] = {}
    with contextlib.ExitStack() as stack:
        blobs = []
        for number, layer in enumerate(image.layers):
            blob = stack.enter_context(open_blob(image.layout, layer.digest, f"layer {number}"))
            verify_open_blob(blob, layer, f"layer {number}")
            blobs.append(blob)
        for number, (layer, blob) in enumerate(zip(image.layers, blobs, strict=True)):
            compression = LAYER_MEDIA_TYPES[layer.media_type]
            try:
                with decompressed(blob, compression) as stream:
                    apply_layer(stream, target, report, directories, limits)
            except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as error:
                raise OciError(f"layer {number} ({layer.digest}) is not a valid tar archive: {error}") from None
            except OciError as error:
                raise OciError(f"layer {number} ({layer.digest}): {error}") from None
    finish_directories(directories)
    return report


def apply_layer(
    stream: IO[bytes],
    root: str | Path,
    report: UnpackReport | None = None,
    directories: dict[str, tuple[int, int, int, float]] | None = None,
    limits: UnpackLimits | None = None,
) -> UnpackReport:
    """Apply one uncompressed layer tar onto the tree at ``root``.

    ``directories`` collects each directory's metadata, applied by
    ``finish_directories`` once every layer is in (a read-only directory must
    not stop later entries); without it they are applied at the end of this layer.
    ``limits`` count over every layer that shares ``report``."""
    root = os.fspath(root)
    report = report if report is not None else UnpackReport()
    limits = limits or UnpackLimits()
    own_directories = directories is None
    directories = {} if directories is None else directories
    touched: set[str] = set()  # paths this layer made, with their parents
    opaque: list[str] = []
    as_root = os.geteuid() == 0
    with tarfile.open(fileobj=stream, mode="r|", tarinfo=BoundedTarInfo) as archive:
        for member in archive:
            limits.count(report, member)
            try:
                relative = entry_path(member.name)
            except OciError:
                report.skipped_unsafe.append(member.name)  # ``..`` or NUL: never written
                continue
            if not relative:
                if member.isdir():
                    directories[root] = (member.mode, member.uid, member.gid, member.mtime)
                continue
            parent, _, name = relative.rpartition("/")
            if name == OPAQUE_WHITEOUT:
                opaque.append(parent)
                report.whiteouts += 1
                continue
            if name.startswith(WHITEOUT_PREFIX):
                report.whiteouts += 1
                hidden = name[len(WHITEOUT_PREFIX):]
                if hidden.startswith(WHITEOUT_PREFIX) or hidden in ("", ".", ".."):
                    continue  # other .wh..wh. markers (aufs internals): nothing to do
                hidden_path = f"{parent}/{hidden}" if parent else hidden
                if hidden_path not in touched:
                    parent_dir = resolve_in_root(root, parent)
                    if os.path.isdir(parent_dir) and not os.path.islink(parent_dir):
                        remove_path(os.path.join(parent_dir, hidden))
                continue
            _mark(touched, relative)
            report.entries += 1
            parent_dir = ensure_directory(root, parent)
            destination = os.path.join(parent_dir, name)
            _apply_member(archive, member, root, destination, relative, report, directories, as_root)
        for directory in opaque:
            host_dir = resolve_in_root(root, directory)
            if os.path.isdir(host_dir) and not os.path.islink(host_dir):
                _remove_untouched(host_dir, directory, touched)
    if own_directories:
        finish_directories(directories)
    return report


def _mark(touched: set[str], relative: str) -> None:
    touched.add(relative)
    while "/" in relative:
        relative = relative.rpartition("/")[0]
        touched.add(relative)


def _remove_untouched(host_dir: str, relative: str, touched: set[str]) -> None:
    """An opaque directory: keep only what this layer put in it."""
    for name in os.listdir(host_dir):
        child = f"{relative}/{name}" if relative else name
        host_child = os.path.join(host_dir, name)
        if child not in touched:
            remove_path(host_child)
        elif os.path.isdir(host_child) and not os.path.islink(host_child):
            _remove_untouched(host_child, child, touched)


def _apply_member(
    archive: tarfile.TarFile,
    member: tarfile.TarInfo,
    root: str,
    destination: str,
    relative: str,
    report: UnpackReport,
    directories: dict[str, tuple[int, int, int, float]],
    as_root: bool,
) -> None:
    try:
        existing = os.lstat(destination)
    except FileNotFoundError:
        existing = None
    if member.isdir():
        if existing is not None and not stat.S_ISDIR(existing.st_mode):
            os.unlink(destination)
            existing = None
        if existing is None:
            os.mkdir(destination, 0o700)
        directories[destination] = (member.mode, member.uid, member.gid, member.mtime)
        if member.mode & ~KEPT_MODE_BITS & 0o7777:
            report.cleared_setid.append("/" + relative)
        if as_root:
            os.lchown(destination, member.uid, member.gid)
        return
    if member.ischr() or member.isblk():
        # Never a device node: one owned by a user could open the host's disks.
        report.skipped_devices.append("/" + relative)
        return
    if not (member.isreg() or member.issym() or member.islnk() or member.isfifo()):
        report.skipped_other.append("/" + relative)
        return
    linked = ""
    if member.islnk():
        try:
            linked = entry_path(member.linkname)
        except OciError:
            report.skipped_unsafe.append("/" + relative)  # a hard link to ``../``: never made
            return
    if existing is not None:
        remove_path(destination)
    if member.isreg():
        source = archive.extractfile(member)
        assert source is not None
        descriptor = os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(descriptor, "wb") as target:
            shutil.copyfileobj(source, target, COPY_CHUNK_BYTES)
    elif member.issym():
        os.symlink(member.linkname, destination)
    elif member.islnk():
        source_path = resolve_in_root(root, linked, follow_last=False)
        try:
            info = os.lstat(source_path)
        except FileNotFoundError:
            raise OciError(f"hard link /{relative} names /{linked}, which is not there") from None
        if stat.S_ISDIR(info.st_mode):
            raise OciError(f"hard link /{relative} names the directory /{linked}")
        os.link(source_path, destination, follow_symlinks=False)
        return  # the link shares its target's inode and metadata
    else:
        os.mkfifo(destination, 0o600)
    if as_root:
        os.lchown(destination, member.uid, member.gid)
    if not member.issym():
        if member.mode & ~KEPT_MODE_BITS & 0o7777:
            report.cleared_setid.append("/" + relative)
        os.chmod(destination, member.mode & KEPT_MODE_BITS)
        _set_xattrs(destination, member)
    with contextlib.suppress(OSError):
        os.utime(destination, (member.mtime, member.mtime), follow_symlinks=False)


def _set_xattrs(path: str, member: tarfile.TarInfo) -> None:
    """``user.*`` extended attributes from PAX headers. The others can grant
    privileges or access (``security.capability``, ACLs, ``trusted.*``) or label
    files for a host policy (``security.selinux``): never set."""
    for key, value in (member.pax_headers or {}).items():
        if not key.startswith("SCHILY.xattr."):
            continue
        name = key[len("SCHILY.xattr."):]
        if not name.startswith(KEPT_XATTR_PREFIX):
            continue
        raw = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
        with contextlib.suppress(OSError):
            os.setxattr(path, name, raw, follow_symlinks=False)


def finish_directories(directories: dict[str, tuple[int, int, int, float]]) -> None:
    """Directory modes and times, deepest first (writing into one changes its mtime)."""
    for path in sorted(directories, key=lambda p: p.count("/"), reverse=True):
        mode, _, _, mtime = directories[path]
        try:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                continue
            os.chmod(path, mode & KEPT_MODE_BITS)
            os.utime(path, (mtime, mtime))
        except FileNotFoundError:
            continue  # removed by a later layer
    directories.clear()
