"""Network namespaces: naming, entering (from a thread of its own), listing, deleting.

Namespaces are the ones ``ip netns`` makes (a bind mount in ``/run/netns``), so
an operator sees Kiln's with ``ip netns``. Work inside one happens in a thread
made for it that calls ``setns(2)`` (Python 3.11 has no ``os.setns``): a
namespace is a property of a thread, so the thread enters, works and ends, and
no other code ever runs in it. Processes it starts (``ip``) inherit it.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import shlex
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
IP = "ip"
T = TypeVar("T")


class NetnsError(RuntimeError):
    """A namespace or link operation failed; ``str()`` says which and why."""


_libc = ctypes.CDLL(None, use_errno=True)


def _enter(name: str) -> None:
    fd = os.open(NETNS_DIR / name, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            error = ctypes.get_errno()
            raise NetnsError(f"setns into {name}: {os.strerror(error)}")
    finally:
        os.close(fd)


async def run_in(name: str, work: Callable[[], T]) -> T:
    """Run ``work()`` in a new thread inside namespace ``name``; its result or its exception."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def deliver(result: T | None, error: BaseException | None) -> None:
        if future.cancelled():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def thread_main() -> None:
        try:
            _enter(name)
            result = work()
        except BaseException as error:  # noqa: BLE001 - handed to the awaiting task
            loop.call_soon_threadsafe(deliver, None, error)
        else:
            loop.call_soon_threadsafe(deliver, result, None)

    # A thread of its own, never a pool's: it must not run anything else afterwards.
    threading.Thread(target=thread_main, name=f"netns:{name}", daemon=True).start()
    return await future


def run_ip_sync(args: list[str], batch: list[str] | None = None) -> str:
    """``ip ARGS`` (or ``ip -batch -`` fed ``batch``) in the calling thread's namespace."""
    argv = [IP, *args] if batch is None else [IP, *args, "-batch", "-"]
    process = subprocess.run(
        argv,
        input="\n".join(batch) + "\n" if batch is not None else None,
        capture_output=True,
        text=True,
        check=False,
    )
    if process.returncode != 0:
        what = shlex.join(argv) if batch is None else f"{shlex.join(argv)} <<< {batch!r}"
        raise NetnsError(f"{what} failed: {process.stderr.strip()}")
    return process.stdout


async def run_ip(args: list[str], batch: list[str] | None = None) -> str:
    """``ip`` in the host's namespace (the server's), without blocking the loop."""
    argv = [IP, *args] if batch is None else [IP, *args, "-batch", "-"]
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=subprocess.PIPE if batch is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    stdin = ("\n".join(batch) + "\n").encode() if batch is not None else None
    stdout, stderr = await process.communicate(stdin)
    if process.returncode != 0:
        what = shlex.join(argv) if batch is None else f"{shlex.join(argv)} <<< {batch!r}"
        raise NetnsError(f"{what} failed: {stderr.decode(errors='replace').strip()}")
    return stdout.decode()


def write_sysctl(path: str, value: str) -> None:
    """Write ``/proc/sys/<path>`` (``net/ipv4/ip_forward``) in the calling thread's namespace."""
    Path("/proc/sys", path).write_text(value)


def exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def names() -> list[str]:
    try:
        return sorted(entry.name for entry in NETNS_DIR.iterdir())
    except FileNotFoundError:
        return []


async def add(name: str) -> None:
    await run_ip(["netns", "add", name])


async def delete(name: str) -> None:
    """Remove namespace ``name``; nothing if it is gone. Its devices go with it
    once no process holds it (QEMU's TAP fd keeps it until QEMU exits)."""
    if not exists(name):
        return
    try:
        await run_ip(["netns", "delete", name])
    except NetnsError:
        if exists(name):
            raise
