"""QEMU processes and the host tools the driver runs: liveness, signals, logs."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

from kiln.runtime.errors import RuntimeFailure

POLL_SECONDS = 0.05
LOG_TAIL_BYTES = 3000


def process_is_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie; reaps it if it is our child."""
    with contextlib.suppress(ChildProcessError):
        reaped, _ = os.waitpid(pid, os.WNOHANG)
        if reaped == pid:
            return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state letter follows the parenthesised command name, which may contain spaces.
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def qemu_argv(pid: int) -> list[bytes] | None:
    """The command line of ``pid`` if it is a QEMU system emulator, else None."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    if not argv or not os.path.basename(argv[0]).startswith(b"qemu-system"):
        return None
    return argv


def process_runs_in(pid: int, run_dir: Path) -> bool:
    """True if ``pid`` is a live QEMU whose command line names ``run_dir`` (so a
    recycled pid is never mistaken for our VM)."""
    argv = qemu_argv(pid)
    marker = str(run_dir).encode() + b"/"
    return argv is not None and process_is_alive(pid) and any(marker in part for part in argv)


def qemu_processes_under(directory: Path) -> dict[int, Path]:
    """Live QEMU processes whose run dir (the directory of their QMP socket) is
    directly under ``directory``: pid -> run dir. Finds VMs whose run dir or
    record is gone (a crash between removing one and stopping the other)."""
    found: dict[int, Path] = {}
    prefix = str(directory.resolve()).encode() + b"/"
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        argv = qemu_argv(int(entry.name))
        if argv is None:
            continue
        for part in argv:
            # The QMP chardev: "socket,id=qmp,path=<run dir>/qmp.sock,..."
            start = part.find(b"path=" + prefix)
            if b"id=qmp" in part and start >= 0:
                path = part[start + len(b"path=") :].split(b",", 1)[0]
                found[int(entry.name)] = Path(os.fsdecode(path)).parent
    return {pid: run_dir for pid, run_dir in found.items() if process_is_alive(pid)}


def open_inodes(pid: int) -> set[tuple[int, int]]:
    """(device, inode) of every file the process holds open."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                status = fd.stat()
                inodes.add((status.st_dev, status.st_ino))
    return inodes


def read_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


def log_tail(path: Path, limit: int = LOG_TAIL_BYTES, *, strip: bool = True) -> str:
    """The last ``limit`` bytes of a log file as text ("" if there is none)."""
    try:
        with path.open("rb") as file:
            file.seek(0, os.SEEK_END)
            file.seek(max(0, file.tell() - limit))
            text = file.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return text.strip() if strip else text


async def signal_and_wait(pid: int, grace: float) -> None:
    """SIGTERM the process group led by ``pid``, SIGKILL it after ``grace``, wait for exit."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            # QEMU leads its own session (and process group).
            if os.getpgid(pid) == pid:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not process_is_alive(pid):
                return
            await asyncio.sleep(POLL_SECONDS)
    raise RuntimeFailure(f"QEMU process {pid} survived SIGKILL")


async def run_tool(*argv: str) -> str:
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
    )
    stdout, stderr = await process.communicate()
    if process.returncode != 0:
        raise RuntimeFailure(
            f"{shlex.join(argv)} failed ({process.returncode}): {stderr.decode(errors='replace').strip()}"
        )
    return stdout.decode()
