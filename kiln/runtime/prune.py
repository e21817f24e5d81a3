"""Which image builds and base snapshots of the cache may go (``kiln images prune``).

The cache (``KILN_CACHE_DIR``) holds one directory per image build
(``images/<variant>-<digest>/``) and per base snapshot
(``base-snapshots/<key>/``). Builds are never replaced in place: VM disks,
snapshots and saved memory point at them by path. So a directory goes only
when nothing is known to need it:

- **Design: keep what anything points at.** *What:* a directory is kept when
  (1) it is the current build of a variant, or a base snapshot of a current
  build; (2) a path inside it appears in a disk's backing chain (``qemu-img
  info --backing-chain``) or in a JSON state file under a data dir's ``vms/``
  or ``snapshots/`` (running, suspended and saved VMs, user snapshots); (3)
  a live process on the host has a file inside it mapped, open, or on its
  command line (``/proc``: running VMs and the warm pool of *every* server on
  this cache, whatever its data dir); (4) a kept base snapshot's disk is
  backed by it. *Why:* deleting a file QEMU has open leaves the VM running
  until it reopens the file by name (a save, a resume, a restore), when it
  fails: only what nothing names is safe to remove.
- **A cache shared by several data dirs** (as on a development machine):
  suspended VMs and snapshots of another data dir have no process, so only
  naming that data dir too (``--data-dir``) keeps what they stand on.
- Directories being built (``.build-*``, dot-names) are never touched, and a
  prune holds the image builds' lock (``prune_cache``): a build renamed into
  place an instant before its ``.current`` pointer moves is never seen as
  unneeded. The server's automatic pass skips a round while a build runs
  rather than wait for it.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from kiln.config import Settings
from kiln.runtime.driver import BootImage
from kiln.runtime.images import BUILD_LOCK_FILE
from kiln.runtime.snapshots import BASE_SNAPSHOTS_DIR_NAME, image_digest

QEMU_IMG = "qemu-img"
STATE_FILE_SUFFIXES = (".json",)
DISK_SUFFIXES = (".qcow2",)

# Reads a disk's backing chain: every file name in it (the disk itself first).
ChainReader = Callable[[Path], list[str]]


@dataclass
class PrunePlan:
    keep: dict[Path, str] = field(default_factory=dict)
    remove: list[Path] = field(default_factory=list)

    def bytes_freed(self) -> int:
        return sum(_size(path) for path in self.remove)


def backing_chain(disk: Path) -> list[str]:
    # -U: running VMs hold their disks open (and locked); nothing is written here.
    done = subprocess.run(
        [QEMU_IMG, "info", "-U", "--backing-chain", "--output=json", str(disk)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        return []
    return [str(layer.get("filename", "")) for layer in json.loads(done.stdout)]


def cache_entries(settings: Settings) -> list[Path]:
    """Every build and base snapshot directory (none being built)."""
    entries = []
    for root in (settings.images_dir, settings.cache_dir / BASE_SNAPSHOTS_DIR_NAME):
        if root.is_dir():
            entries += [
                path
                for path in sorted(root.iterdir())
                if path.is_dir() and not path.is_symlink() and not path.name.startswith(".")
            ]
    return entries


def current_builds(settings: Settings) -> dict[Path, BootImage]:
    """The build each ``<variant>.current`` names, as a boot image (for its digest)."""
    found: dict[Path, BootImage] = {}
    root = settings.images_dir
    if not root.is_dir():
        return found
    for pointer in root.glob("*.current"):
        try:
            directory = (root / os.readlink(pointer)).resolve()
            build = json.loads((directory / "build.json").read_text())
        except (OSError, ValueError):
            continue
        variant = pointer.name.removesuffix(".current")
        found[directory] = BootImage(
            variant=variant,
            kernel=directory / "vmlinuz",
            initrd=directory / "initrd.img",
            rootfs=directory / "rootfs.ext4",
            cmdline=build.get("cmdline", ""),
        )
    return found


def _files(root: Path, suffixes: tuple[str, ...]) -> Iterator[Path]:
    if not root.is_dir():
        return
    for directory, _, names in os.walk(root):
        for name in names:
            if name.endswith(suffixes):
                yield Path(directory) / name


def _strings(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def data_dir_references(data_dir: Path, chain: ChainReader) -> Iterator[tuple[str, str]]:
    """(path, why) for every path the VMs and snapshots of a data dir name."""
    for sub in ("vms", "snapshots"):
        root = data_dir / sub
        for disk in _files(root, DISK_SUFFIXES):
            for name in chain(disk):
                yield name, f"backing chain of {disk}"
        for state in _files(root, STATE_FILE_SUFFIXES):
            try:
                parsed = json.loads(state.read_text())
            except (OSError, ValueError):
                continue
            for text in _strings(parsed):
                if text.startswith("/"):
                    yield text, f"named in {state}"


def process_references(proc: Path = Path("/proc")) -> Iterator[tuple[str, str]]:
    """(path, why) for every file a live process maps, holds open or names in its argv."""
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        why = f"in use by process {entry.name}"
        try:
            for line in (entry / "maps").read_text().splitlines():
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].startswith("/"):
                    yield parts[5].removesuffix(" (deleted)"), why
            for fd in (entry / "fd").iterdir():
                yield os.readlink(fd), why
            for argument in (entry / "cmdline").read_bytes().split(b"\0"):
                text = argument.decode(errors="replace")
                # QEMU names files inside options (file=/path,...): every path-looking piece counts.
                for piece in text.replace(",", "=").split("="):
                    if piece.startswith("/"):
                        yield piece, why
        except OSError:
            continue  # gone, or not ours to read


def plan_prune(
    settings: Settings,
    data_dirs: Iterable[Path],
    *,
    chain: ChainReader = backing_chain,
    processes: Callable[[], Iterable[tuple[str, str]]] = process_references,
) -> PrunePlan:
    entries = {path.resolve(): path for path in cache_entries(settings)}
    roots = {str(settings.cache_dir), str(settings.cache_dir.resolve())}
    plan = PrunePlan()

    def keep(name: str, why: str) -> None:
        # Most names (libraries a process maps, its sockets) are elsewhere: a string
        # test first, so /proc's hundreds of thousands of lines stay cheap.
        if not any(name.startswith(root) for root in roots):
            return
        try:
            resolved = Path(name).resolve()
            inside = resolved.relative_to(settings.cache_dir.resolve())
        except (OSError, ValueError):
            return
        if len(inside.parts) < 2:
            return
        entry = settings.cache_dir.resolve() / inside.parts[0] / inside.parts[1]
        if entry in entries and entry not in plan.keep:
            plan.keep[entry] = why

    current = current_builds(settings)
    digests = {}
    for directory, image in current.items():
        keep(str(directory), f"the current build of {image.variant}")
        try:
            digests[f"{image.variant}-{image_digest(image)}-"] = image.variant
        except OSError:
            continue
    for entry in entries:
        for prefix, variant in digests.items():
            if entry.name.startswith(prefix):
                keep(str(entry), f"a base snapshot of the current build of {variant}")
    for data_dir in data_dirs:
        for name, why in data_dir_references(data_dir, chain):
            keep(name, why)
    for name, why in processes():
        keep(name, why)
    # A kept base snapshot keeps the build its disk is written on top of.
    for entry in list(plan.keep):
        for disk in _files(entry, DISK_SUFFIXES):
            for name in chain(disk):
                keep(name, f"under kept {entry.name}")
    plan.remove = [entry for entry in entries if entry not in plan.keep]
    return plan


class BuildInProgress(Exception):
    """An image build holds the cache (the automatic pass tries again later)."""


@contextmanager
def builds_held(settings: Settings, wait: bool) -> Iterator[None]:
    """No image build runs meanwhile; ``wait=False``: ``BuildInProgress`` if one does."""
    settings.cache_dir.mkdir(parents=True, exist_ok=True)
    with open(settings.cache_dir / BUILD_LOCK_FILE, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError as error:
            raise BuildInProgress("an image build is running") from error
        yield


def prune_cache(settings: Settings, data_dirs: Iterable[Path], *, dry_run: bool, wait: bool) -> tuple[PrunePlan, int]:
    """Plan and (unless ``dry_run``) remove, with builds held off; the plan and the bytes freed
    (that would be, for a dry run). ``kiln images prune`` and the server's pass both call it."""
    with builds_held(settings, wait):
        plan = plan_prune(settings, data_dirs)
        return plan, plan.bytes_freed() if dry_run else remove(plan)


def remove(plan: PrunePlan) -> int:
    freed = 0
    for path in plan.remove:
        size = _size(path)
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            freed += size
    return freed


def _size(path: Path) -> int:
    total = 0
    for directory, _, names in os.walk(path):
        for name in names:
            try:
                total += (Path(directory) / name).lstat().st_blocks * 512
            except OSError:
                continue
    return total
