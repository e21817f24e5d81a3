"""An OCI image layout (image-spec ``image-layout.md``): read and verify it.

A layout is a directory holding ``oci-layout`` (``{"imageLayoutVersion":
"1.0.0"}``), ``index.json`` (an image index) and ``blobs/<algorithm>/<hex>``:
content-addressed manifests, configs and layers. ``open_layout`` follows
index.json to one image manifest (the linux/amd64 one when the index lists
several platforms, also through nested indexes), reads and verifies its config,
and checks that every layer blob is there with the size its descriptor says.

Blobs (and the layout's own two files) are opened without following any
symlink below the layout directory and only if they are regular files
(``open_blob``): a layout cannot make Kiln read or hash a host file, and a FIFO
planted as a blob cannot hang it. ``private_dir`` makes the 0700 directory
unpacked trees and pulled layouts live in.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

LAYOUT_FILE = "oci-layout"
INDEX_FILE = "index.json"
PLATFORM = ("linux", "amd64")
# Manifests, indexes and configs are small; a bigger one is not what it claims.
MAX_JSON_BLOB_BYTES = 8 * 1024 * 1024
COPY_CHUNK_BYTES = 1024 * 1024
# A manifest listing more layers than this is not an image anyone builds.
MAX_LAYERS = 256
PRIVATE_DIR_NAME = "private"
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
