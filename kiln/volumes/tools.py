"""The host programs this package runs, each behind a small typed function.

qemu-img for the qcow2 layers (no library manages qcow2 chains offline), and
e2fsprogs (``mkfs.ext4``, ``e2fsck``, ``resize2fs``, ``dumpe2fs``) for the
filesystem while no VM has it. e2fsprogs parse what a guest wrote, so they run
as an unprivileged user (``settings.volume_tools_user``), with no capabilities
and no way to gain any, on a raw view of the image (``kiln.volumes.rawview``);
qemu-img only reads qcow2 metadata, which QEMU writes and a guest cannot.
"""

from __future__ import annotations

import asyncio
import json
import pwd
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

from kiln.volumes.errors import VolumeError

QEMU_IMG = "qemu-img"
TOOL_TIMEOUT_SECONDS = 600.0


@dataclass(frozen=True)
class Identity:
    """An unprivileged user to run a program as."""

    uid: int
    gid: int

    @classmethod
    def of_user(cls, name: str) -> Identity:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise VolumeError(
                f"the volume tools user {name!r} does not exist on this host"
            ) from None
        if entry.pw_uid == 0:
            raise VolumeError(
                f"the volume tools user {name!r} is root; name an unprivileged user"
            )
        return cls(entry.pw_uid, entry.pw_gid)

    def wrap(self, argv: list[str]) -> list[str]:
        return [
            "setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups",
            "--no-new-privs", "--inh-caps=-all", "--bounding-set=-all", "--", *argv,
        ]  # fmt: skip


@dataclass(frozen=True)
class ToolResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    def describe(self) -> str:
        detail = (self.stderr.strip() or self.stdout.strip())[-1500:]
        return f"{shlex.join(self.argv)} exited with {self.returncode}: {detail}"


async def run(
    *argv: str,
    check: bool = True,
    as_user: Identity | None = None,
    pass_fds: tuple[int, ...] = (),
    timeout: float = TOOL_TIMEOUT_SECONDS,
) -> ToolResult:
    command = as_user.wrap(list(argv)) if as_user is not None else list(argv)
    process = await asyncio.create_subprocess_exec(
        *command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        pass_fds=pass_fds,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
    except BaseException:
        if process.returncode is None:
            process.kill()
            await process.wait()
        raise
    result = ToolResult(
        tuple(argv),
        process.returncode or 0,
        stdout.decode(errors="replace"),
        stderr.decode(errors="replace"),
    )
    if check and result.returncode != 0:
        raise VolumeError(result.describe())
    return result


# ---- qemu-img


async def create_qcow2(
    path: Path, size_bytes: int, backing_name: str | None = None
) -> None:
    """A new qcow2 file; ``backing_name`` is written into its header as is
    (relative to ``path``'s directory). ``-u``: the backing file need not be
    opened, so a running QEMU may hold it."""
    argv = [QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536"]
    if backing_name is not None:
        argv += ["-F", "qcow2", "-b", backing_name, "-u"]
    await run(*argv, str(path), str(size_bytes))


async def convert_raw_to_qcow2(raw: Path, target: Path) -> None:
    # Zero and unallocated ranges of the raw file stay unallocated in the qcow2.
    await run(
        QEMU_IMG,
        "convert",
        "-q",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=65536",
        str(raw),
        str(target),
    )


async def resize_qcow2(path: Path, size_bytes: int, *, shrink: bool = False) -> None:
    argv = [QEMU_IMG, "resize", "-q", "-f", "qcow2"]
    if shrink:
        argv.append("--shrink")
    await run(*argv, str(path), str(size_bytes))


async def image_info(path: Path) -> dict:
    # -U: a VM may have the file open; the header is all this reads.
    result = await run(QEMU_IMG, "info", "-U", "--output=json", str(path))
    return dict(json.loads(result.stdout))


async def backing_name(path: Path) -> str | None:
    info = await image_info(path)
    name = info.get("backing-filename")
    return str(name) if name else None


async def rebase(path: Path, new_backing_name: str | None) -> None:
    """Make ``path`` read its base from ``new_backing_name`` (None: from no
    file) with the same content: qemu-img copies into ``path`` what the old
    backing chain provides and the new one does not ("safe" mode)."""
    argv = [QEMU_IMG, "rebase", "-q", "-f", "qcow2"]
    if new_backing_name is None:
        argv += ["-b", ""]
    else:
        argv += ["-F", "qcow2", "-b", new_backing_name]
    await run(*argv, str(path))


async def repair_leaks(path: Path) -> ToolResult:
    """Reclaim clusters a killed QEMU allocated but never referenced (a leak is
    harmless to the data; ``-r leaks`` touches nothing else)."""
    result = await run(
        QEMU_IMG, "check", "-q", "-r", "leaks", "-f", "qcow2", str(path), check=False
    )
    # 0: clean (or leaks fixed); 3: leaks remained; 1/2: it could not check or found corruption.
    if result.returncode not in (0, 3):
        raise VolumeError(f"the qcow2 image {path} is damaged: {result.describe()}")
    return result


# ---- e2fsprogs


async def make_ext4(raw: Path) -> None:
    """An empty ext4 filling the raw file. No blocks reserved for root (it is
    all the user's quota); inode tables and journal zeroed now (cheap: holes
    in a sparse file) so the guest's first mount has no lazy init to do.
    4 KiB blocks and an inode per 16 KiB whatever the size: mke2fs would make
    a "small" filesystem (1 KiB blocks) below 512 MiB, which resize2fs then
    cannot shrink much after it was grown."""
    await run(
        "mkfs.ext4", "-q", "-F", "-m", "0", "-L", "kiln-volume", "-b", "4096", "-i", "16384", "-I", "256",
        "-E", "lazy_itable_init=0,lazy_journal_init=0,nodiscard", str(raw),
    )  # fmt: skip


@dataclass(frozen=True)
class FsckOutcome:
    returncode: int
    output: str

    @property
    def repaired(self) -> bool:
        return bool(self.returncode & 1)


async def check_ext4(
    device: Path, as_user: Identity, pass_fds: tuple[int, ...]
) -> FsckOutcome:
    """``e2fsck -p`` (replay the journal, fix what is safe), then ``-fy`` if
    that asked for a manual run. Exit bits: 1 fixed, 2 reboot (n/a), 4 left
    unfixed, 8+ could not run."""
    preen = await run(
        "e2fsck", "-p", str(device), check=False, as_user=as_user, pass_fds=pass_fds
    )
    if preen.returncode & ~3 == 0:
        return FsckOutcome(preen.returncode, preen.stdout + preen.stderr)
    full = await _e2fsck_fix_all(device, as_user, pass_fds)
    return FsckOutcome(
        full.returncode, preen.stdout + preen.stderr + full.stdout + full.stderr
    )


async def _e2fsck_fix_all(device: Path, as_user: Identity, pass_fds: tuple[int, ...]) -> ToolResult:
    """A forced full check that answers yes to every repair."""
    return await run("e2fsck", "-f", "-y", str(device), check=False, as_user=as_user, pass_fds=pass_fds)


async def resize_ext4(
    device: Path, size_bytes: int, as_user: Identity, pass_fds: tuple[int, ...]
) -> ToolResult:
    """Offline grow or shrink to ``size_bytes``; resize2fs wants a checked fs first."""
    await _e2fsck_fix_all(device, as_user, pass_fds)
    return await run(
        "resize2fs",
        str(device),
        f"{size_bytes // 1024}K",
        check=False,
        as_user=as_user,
        pass_fds=pass_fds,
    )


@dataclass(frozen=True)
class Superblock:
    block_size: int
    block_count: int
    free_blocks: int

    @property
    def used_bytes(self) -> int:
        return (self.block_count - self.free_blocks) * self.block_size

    @property
    def total_bytes(self) -> int:
        return self.block_count * self.block_size


def parse_superblock(dumpe2fs_output: str) -> Superblock:
    fields: dict[str, str] = {}
    for line in dumpe2fs_output.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    try:
        return Superblock(
            block_size=int(fields["Block size"]),
            block_count=int(fields["Block count"]),
            free_blocks=int(fields["Free blocks"]),
        )
    except (KeyError, ValueError) as error:
        raise VolumeError(
            f"cannot read the filesystem's superblock ({error!r})"
        ) from None


async def read_superblock(
    device: Path, as_user: Identity, pass_fds: tuple[int, ...]
) -> Superblock:
    result = await run(
        "dumpe2fs", "-h", str(device), as_user=as_user, pass_fds=pass_fds
    )
    return parse_superblock(result.stdout)
