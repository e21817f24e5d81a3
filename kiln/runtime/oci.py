"""OCI images: read an image layout, verify it, unpack its layers into a tree.

An OCI image layout (image-spec ``image-layout.md``) is a directory holding
``oci-layout`` (``{"imageLayoutVersion": "1.0.0"}``), ``index.json`` (an image
index) and ``blobs/<algorithm>/<hex>``: content-addressed manifests, configs and
layers. ``open_layout`` follows index.json to one image manifest (the
linux/amd64 one when the index lists several platforms, also through nested
indexes), reads and verifies its config, and checks that every layer blob is
there with the size its descriptor says. ``unpack`` verifies each layer's digest
and applies the layers in order (image-spec ``layer.md``):

- media types: plain tar, gzip and zstd (``zstd`` tool), OCI and Docker names;
- whiteouts: ``.wh.<name>`` deletes ``<name>`` of the layers below;
  ``.wh..wh..opq`` hides everything the layers below put in its directory;
- an entry replaces what is at its path (a file never writes through an old
  file, hard link or symlink: the old one is unlinked first);
- nothing is written outside the tree: entry names with ``..`` are refused, and
  every path is resolved as the guest would, with symlinks (absolute ones
  too) taken relative to the tree, never the host's root;
- nothing that grants privileges is kept: setuid and setgid bits are cleared,
  device nodes are never made (a guest's ``/dev`` is a devtmpfs anyway), and of
  the extended attributes only ``user.*`` ones are set (never
  ``security.capability``, ACLs or ``trusted.*``). FIFOs are kept; ownership is
  kept as root. The tree is unpacked inside a private (0700) directory
  (``private_dir``), so no other host user can reach it while it exists;
- an image is bounded: ``UnpackLimits`` caps the bytes of file content and the
  number of entries, and tar metadata headers (PAX, GNU long names) are capped
  before they are read into memory.

Blobs are opened without following symlinks below the layout directory, must
be regular files, and each layer is hashed and then unpacked from the same open
file: nothing is read again by path between its digest check and its unpacking.

Registry references are pulled into a layout with ``skopeo`` when the server
has it (``pull``); without it, or without network, ``pull`` fails within a
bounded time with a reason that says so.

Stdlib only; nothing here knows about VMs, users or HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gzip
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from kiln.runtime import registry

LAYOUT_FILE = "oci-layout"
INDEX_FILE = "index.json"
WHITEOUT_PREFIX = ".wh."
OPAQUE_WHITEOUT = ".wh..wh..opq"
PLATFORM = ("linux", "amd64")
# Manifests, indexes and configs are small; a bigger one is not what it claims.
MAX_JSON_BLOB_BYTES = 8 * 1024 * 1024
MAX_SYMLINK_HOPS = 40
COPY_CHUNK_BYTES = 1024 * 1024
# A manifest listing more layers than this is not an image anyone builds.
MAX_LAYERS = 256
# PAX headers and GNU long names are read whole into memory by tarfile.
MAX_TAR_METADATA_BYTES = 1024 * 1024
PRIVATE_DIR_NAME = "private"
# Mode bits an unpacked entry may keep: everything but setuid and setgid.
KEPT_MODE_BITS = 0o1777
# Extended attributes copied from PAX headers: only these grant nothing.
KEPT_XATTR_PREFIX = "user."

INDEX_MEDIA_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
MANIFEST_MEDIA_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
# Layer media type -> compression.
LAYER_MEDIA_TYPES = {
    "application/vnd.oci.image.layer.v1.tar": "none",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "none",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar": "none",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd": "zstd",
}
DIGEST_PATTERN = re.compile(r"(sha256):([0-9a-f]{64})|(sha512):([0-9a-f]{128})")


class OciError(Exception):
    """The image is unusable; ``str()`` says why, fit to show the client."""


class NotALayout(OciError):
    """The directory is no OCI image layout."""


class DigestMismatch(OciError):
    """A blob's content does not match its digest (or its size)."""


class RegistryError(OciError):
    """A registry reference could not be pulled."""


# ---------------------------------------------------------------- the layout


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: dict | None = None

    @classmethod
    def parse(cls, data: object, what: str) -> Descriptor:
        if not isinstance(data, dict):
            raise OciError(f"{what}: a descriptor must be an object")
        media_type, digest, size = data.get("mediaType"), data.get("digest"), data.get("size")
        if not isinstance(media_type, str) or not isinstance(digest, str):
            raise OciError(f"{what}: a descriptor needs mediaType and digest")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise OciError(f"{what}: descriptor {digest} has no valid size")
        if not DIGEST_PATTERN.fullmatch(digest):
            raise OciError(f"{what}: unsupported or malformed digest {digest!r}")
        platform = data.get("platform")
        return cls(media_type, digest, size, platform if isinstance(platform, dict) else None)


@dataclass(frozen=True)
class ImageConfig:
    env: dict[str, str] = field(default_factory=dict)
    working_dir: str | None = None
    user: str | None = None
    os: str | None = None
    architecture: str | None = None


@dataclass(frozen=True)
class OciImage:
    layout: Path
    manifest_digest: str
    config_digest: str
    config: ImageConfig
    layers: tuple[Descriptor, ...]


def _digest_parts(digest: str) -> tuple[str, str]:
    match = DIGEST_PATTERN.fullmatch(digest)
    if match is None:
        raise OciError(f"unsupported or malformed digest {digest!r}")
    if match.group(1):
        return match.group(1), match.group(2)
    return match.group(3), match.group(4)


def blob_path(layout: Path, digest: str) -> Path:
    """Where a blob is in a layout (for writing layouts; reading goes through ``open_blob``)."""
    algorithm, hexdigest = _digest_parts(digest)
    return layout / "blobs" / algorithm / hexdigest


def _hasher(digest: str) -> hashlib._Hash:
    return hashlib.new(digest.split(":", 1)[0])


DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO planted as a blob must not hang the server.
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _open_in_layout(layout: Path, parts: tuple[str, ...]) -> IO[bytes]:
    """``layout/<parts...>`` opened for reading, following no symlink below
    ``layout``, and only if it is a regular file. OSError otherwise."""
    opened: list[int] = []
    try:
        directory = os.open(layout, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        opened.append(directory)
        for part in parts[:-1]:
            directory = os.open(part, DIRECTORY_FLAGS, dir_fd=directory)
            opened.append(directory)
        descriptor = os.open(parts[-1], FILE_FLAGS, dir_fd=directory)
    finally:
        for fd in opened:
            os.close(fd)
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise OSError(errno.EINVAL, "not a regular file")
    os.set_blocking(descriptor, True)
    return os.fdopen(descriptor, "rb")


def open_blob(layout: Path, digest: str, what: str) -> IO[bytes]:
    """A blob's open file (see ``_open_in_layout``); OciError if there is none."""
    algorithm, hexdigest = _digest_parts(digest)
    try:
        return _open_in_layout(layout, ("blobs", algorithm, hexdigest))
    except OSError as error:
        raise OciError(f"{what} {digest} is missing from the layout ({error.strerror})") from None


def _read_layout_file(layout: Path, name: str) -> bytes | None:
    try:
        with _open_in_layout(layout, (name,)) as file:
            return file.read(MAX_JSON_BLOB_BYTES + 1)
    except OSError:
        return None


def read_json_blob(layout: Path, descriptor: Descriptor, what: str) -> dict:
    """A small blob, its size and digest checked, parsed as a JSON object."""
    if descriptor.size > MAX_JSON_BLOB_BYTES:
        raise OciError(f"{what} {descriptor.digest} is too large ({descriptor.size} bytes)")
    with open_blob(layout, descriptor.digest, what) as blob:
        data = blob.read(MAX_JSON_BLOB_BYTES + 1)
    check_content(data, descriptor, what)
    try:
        parsed = json.loads(data)
    except ValueError as error:
        raise OciError(f"{what} {descriptor.digest} is not JSON: {error}") from None
    if not isinstance(parsed, dict):
        raise OciError(f"{what} {descriptor.digest} is not a JSON object")
    return parsed


def check_content(data: bytes, descriptor: Descriptor, what: str) -> None:
    if len(data) != descriptor.size:
        raise DigestMismatch(
            f"{what} {descriptor.digest} is {len(data)} bytes, its descriptor says {descriptor.size}"
        )
    hasher = _hasher(descriptor.digest)
    hasher.update(data)
    actual = f"{hasher.name}:{hasher.hexdigest()}"
    if actual != descriptor.digest:
        raise DigestMismatch(f"{what}: digest mismatch: expected {descriptor.digest}, content is {actual}")


def verify_open_blob(blob: IO[bytes], descriptor: Descriptor, what: str) -> None:
    """Hash an open (large) blob against its descriptor, then rewind it: the
    caller unpacks exactly the file that was hashed."""
    hasher = _hasher(descriptor.digest)
    size = 0
    blob.seek(0)
    try:
        while chunk := blob.read(COPY_CHUNK_BYTES):
            hasher.update(chunk)
            size += len(chunk)
    except OSError as error:
        raise OciError(f"{what} {descriptor.digest} cannot be read ({error.strerror})") from None
    actual = f"{hasher.name}:{hasher.hexdigest()}"
    if size != descriptor.size:
        raise DigestMismatch(f"{what} {descriptor.digest} is {size} bytes, its descriptor says {descriptor.size}")
    if actual != descriptor.digest:
        raise DigestMismatch(f"{what}: digest mismatch: expected {descriptor.digest}, content is {actual}")
    blob.seek(0)


def private_dir(parent: Path) -> Path:
    """``parent/private``, a directory only this process's user can enter (0700):
    unpacked trees and pulled layouts live in it, out of other host users' reach."""
    path = parent / PRIVATE_DIR_NAME
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise OciError(f"{path} is not a directory of this server's user")
    os.chmod(path, 0o700)  # exact, whatever the umask and an earlier mode were
    return path


def open_layout(layout: Path, platform: tuple[str, str] = PLATFORM) -> OciImage:
    """Read the layout's image for ``platform``: manifest, config and layer list.

    Small blobs (manifests, config) are verified here; layers are only checked
    for presence and size (``unpack`` verifies their digests)."""
    layout = Path(layout)
    if not layout.is_dir():
        raise NotALayout(f"{layout} is not a directory")
    marker_bytes = _read_layout_file(layout, LAYOUT_FILE)
    index_bytes = _read_layout_file(layout, INDEX_FILE)
    if marker_bytes is None or index_bytes is None:
        raise NotALayout(
            f"{layout} is not an OCI image layout (it needs the files {LAYOUT_FILE} and {INDEX_FILE})"
        )
    try:
        marker = json.loads(marker_bytes)
        index = json.loads(index_bytes)
    except ValueError as error:
        raise NotALayout(f"{layout} is not an OCI image layout: {error}") from None
    if not isinstance(marker, dict) or not isinstance(marker.get("imageLayoutVersion"), str):
        raise NotALayout(f"{layout}/{LAYOUT_FILE} has no imageLayoutVersion")
    if not isinstance(index, dict):
        raise NotALayout(f"{layout}/{INDEX_FILE} is not a JSON object")
    manifest_descriptor = _choose_manifest(layout, index, platform, depth=0)
    manifest = read_json_blob(layout, manifest_descriptor, "manifest")
    config_descriptor = Descriptor.parse(manifest.get("config"), "manifest config")
    raw_layers = manifest.get("layers")
    if not isinstance(raw_layers, list):
        raise OciError(f"manifest {manifest_descriptor.digest} has no layers list")
    if len(raw_layers) > MAX_LAYERS:
        raise OciError(f"manifest {manifest_descriptor.digest} lists {len(raw_layers)} layers (at most {MAX_LAYERS})")
    layers = tuple(Descriptor.parse(entry, f"layer {number}") for number, entry in enumerate(raw_layers))
    for number, layer in enumerate(layers):
        if layer.media_type not in LAYER_MEDIA_TYPES:
            raise OciError(f"layer {number} ({layer.digest}) has an unsupported media type {layer.media_type!r}")
        with open_blob(layout, layer.digest, f"layer {number}") as blob:
            size = os.fstat(blob.fileno()).st_size
        if size != layer.size:
            raise DigestMismatch(
                f"layer {number} ({layer.digest}) is {size} bytes, its descriptor says {layer.size}"
            )
    config = read_json_blob(layout, config_descriptor, "image config")
    return OciImage(
        layout=layout,
        manifest_digest=manifest_descriptor.digest,
        config_digest=config_descriptor.digest,
        config=parse_config(config),
        layers=layers,
    )


def _choose_manifest(layout: Path, index: dict, platform: tuple[str, str], depth: int) -> Descriptor:
    if depth > 4:
        raise OciError("image indexes are nested too deep")
    raw = index.get("manifests")
    if not isinstance(raw, list) or not raw:
        raise OciError("the image index lists no manifests")
    candidates = [Descriptor.parse(entry, "index entry") for entry in raw]
    usable = [d for d in candidates if d.media_type in MANIFEST_MEDIA_TYPES + INDEX_MEDIA_TYPES]
    if not usable:
        kinds = ", ".join(sorted({d.media_type for d in candidates}))
        raise OciError(f"the image index lists no image manifest (only {kinds})")
    wanted_os, wanted_arch = platform
    matching = [
        d for d in usable
        if d.platform is not None
        and d.platform.get("os") == wanted_os and d.platform.get("architecture") == wanted_arch
    ]
    unlabelled = [d for d in usable if d.platform is None]
    if matching:
        chosen = matching[0]
    elif unlabelled:
        chosen = unlabelled[0]
    else:
        offered = ", ".join(f"{d.platform.get('os')}/{d.platform.get('architecture')}" for d in usable if d.platform)
        raise OciError(f"the image has no {wanted_os}/{wanted_arch} manifest (it has {offered})")
    if chosen.media_type in INDEX_MEDIA_TYPES:
        return _choose_manifest(layout, read_json_blob(layout, chosen, "image index"), platform, depth + 1)
    return chosen


def parse_config(config: dict) -> ImageConfig:
    """Env, WorkingDir and User from an image config (the rest does not apply to a sandbox)."""
    inner = config.get("config") or {}
    if not isinstance(inner, dict):
        raise OciError("the image config's config is not an object")
    env: dict[str, str] = {}
    for entry in inner.get("Env") or []:
        if not isinstance(entry, str) or "=" not in entry or entry.startswith("=") or "\0" in entry:
            raise OciError(f"the image config has a malformed Env entry {entry!r}")
        name, _, value = entry.partition("=")
        env[name] = value
    working_dir = inner.get("WorkingDir") or None
    if working_dir is not None and not isinstance(working_dir, str):
        raise OciError("the image config's WorkingDir is not a string")
    user = inner.get("User") or None
    return ImageConfig(
        env=env,
        working_dir=working_dir,
        user=user if isinstance(user, str) else None,
        os=config.get("os") if isinstance(config.get("os"), str) else None,
        architecture=config.get("architecture") if isinstance(config.get("architecture"), str) else None,
    )


# ---------------------------------------------------------------- paths inside a tree


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


# ---------------------------------------------------------------- unpacking


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

    def _proc_member(self, tarfile: tarfile.TarFile) -> tarfile.TarInfo:  # type: ignore[override]
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


# ---------------------------------------------------------------- registries


REFERENCE_PATTERN = re.compile(
    r"(?:(?P<domain>(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.[a-zA-Z0-9-]+)*(?::[0-9]+)?)/)?"
    r"(?P<path>[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*)"
    r"(?::(?P<tag>[\w][\w.-]{0,127}))?"
    r"(?:@(?P<digest>sha256:[0-9a-f]{64}))?"
)
DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"


@dataclass(frozen=True)
class Reference:
    registry: str  # host[:port] that answers the distribution API
    repository: str
    tag: str | None
    digest: str | None

    def __str__(self) -> str:
        name = f"{self.registry}/{self.repository}"
        if self.tag:
            name += f":{self.tag}"
        if self.digest:
            name += f"@{self.digest}"
        return name


def parse_reference(text: str) -> Reference | None:
    """A registry reference (``python:3.12``, ``docker.io/library/python:3.12``,
    ``ghcr.io/o/r@sha256:...``), or None if ``text`` is not one."""
    match = REFERENCE_PATTERN.fullmatch(text)
    if match is None:
        return None
    domain, path = match.group("domain"), match.group("path")
    if domain is not None and not ("." in domain or ":" in domain or domain == "localhost"):
        # "library/python": the first part is a repository namespace, not a host.
        path, domain = f"{domain}/{path}", None
        if not re.fullmatch(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*", text.split("/")[0]):
            return None
    registry = domain or DOCKER_HUB
    if registry == DOCKER_HUB:
        registry = DOCKER_HUB_API
        if "/" not in path:
            path = f"library/{path}"
    tag = match.group("tag")
    digest = match.group("digest")
    return Reference(registry, path, tag if tag or digest else "latest", digest)


ANONYMOUS_POLICY = '{"default": [{"type": "insecureAcceptAnything"}]}'
PULL_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


async def pull(
    reference: Reference,
    layout: Path,
    timeout: float,
    connect_timeout: float = 10.0,
    resolver: registry.Resolver = registry.system_resolver,
    allow: registry.AddressCheck = registry.is_public,
) -> None:
    """Copy the image into a new OCI layout at ``layout`` (best inside a
    ``private_dir``) with skopeo, within ``timeout`` seconds; RegistryError
    (saying why) otherwise. Whether the registry answers at all is known within
    ``connect_timeout``.

    The pull reaches public addresses only, through a ``registry.PinnedProxy``,
    and runs with none of the operator's registry configuration: no credentials
    (``--src-no-creds``, an empty auth file, a HOME of its own), no client
    certificates, no mirrors or insecure registries (an empty registries.conf)."""
    host, _, port_text = reference.registry.partition(":")
    port = int(port_text or 443)
    try:
        reader_writer = await registry.open_checked(host, port, connect_timeout, resolver, allow)
    except registry.AddressRefused as error:
        raise RegistryError(f"cannot pull {reference}: {error}") from None
    except OSError as error:  # TimeoutError included
        reason = "timed out" if isinstance(error, TimeoutError) else str(error) or type(error).__name__
        raise RegistryError(
            f"cannot pull {reference}: the registry {reference.registry} is unreachable from this "
            f"server ({reason}); import a local OCI image layout directory instead"
        ) from None
    reader_writer[1].close()
    skopeo = shutil.which("skopeo")
    if skopeo is None:
        raise RegistryError(
            f"cannot pull {reference}: this server has no registry client (skopeo); "
            f"copy the image into an OCI layout (skopeo copy docker://... oci:DIR) and import DIR"
        )
    scratch = layout.with_name(layout.name + ".skopeo")
    async with registry.PinnedProxy({443, port}, connect_timeout, resolver, allow) as proxy:
        argv, env = _skopeo_command(skopeo, reference, layout, scratch, await proxy.start())
        process = await asyncio.create_subprocess_exec(
            *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        try:
            _, stderr = await asyncio.wait_for(process.communicate(), timeout)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise RegistryError(f"cannot pull {reference}: no answer within {timeout:g}s") from None
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    if process.returncode != 0:
        if proxy.refusals:
            raise RegistryError(f"cannot pull {reference}: refused {proxy.refusals[0]}")
        tail = stderr.decode(errors="replace").strip().splitlines()[-3:]
        raise RegistryError(f"cannot pull {reference}: {' '.join(tail) or 'skopeo failed'}")


def _skopeo_command(
    skopeo: str, reference: Reference, layout: Path, scratch: Path, proxy_url: str
) -> tuple[list[str], dict[str, str]]:
    """skopeo's argv and whole environment for an anonymous pull through the
    proxy, with its configuration files made empty in ``scratch`` (0700)."""
    scratch.mkdir(mode=0o700)
    for name in ("home", "certs", "registries.d", "tmp", "run"):
        (scratch / name).mkdir(mode=0o700)
    (scratch / "auth.json").write_text("{}")
    (scratch / "registries.conf").write_text("")
    (scratch / "policy.json").write_text(ANONYMOUS_POLICY)
    argv = [
        skopeo,
        "--policy", str(scratch / "policy.json"),
        "--registries.d", str(scratch / "registries.d"),
        "--tmpdir", str(scratch / "tmp"),
        "--override-os", PLATFORM[0], "--override-arch", PLATFORM[1],
        "copy",
        "--src-no-creds",
        "--src-authfile", str(scratch / "auth.json"),
        "--src-cert-dir", str(scratch / "certs"),
        "--src-tls-verify=true",
        f"docker://{reference}", f"oci:{layout}:image",
    ]  # fmt: skip
    # The whole environment: nothing of the server's (its proxies, its HOME with
    # ~/.docker/config.json, REGISTRY_AUTH_FILE) reaches the pull.
    env = {
        "PATH": PULL_PATH,
        "HOME": str(scratch / "home"),
        "XDG_RUNTIME_DIR": str(scratch / "run"),
        "XDG_CONFIG_HOME": str(scratch / "home"),
        "DOCKER_CONFIG": str(scratch / "home"),
        "REGISTRY_AUTH_FILE": str(scratch / "auth.json"),
        "CONTAINERS_REGISTRIES_CONF": str(scratch / "registries.conf"),
        "HTTPS_PROXY": proxy_url,
        "https_proxy": proxy_url,
        "HTTP_PROXY": proxy_url,
        "http_proxy": proxy_url,
        "NO_PROXY": "",
        "no_proxy": "",
    }
    return argv, env
