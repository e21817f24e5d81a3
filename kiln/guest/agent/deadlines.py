"""Bounding the ops that wait on the kernel or a tool: a disk that never appears,
a filesystem check, an unmount, a freeze. The host gives up after its own time
limit; these make the agent give up too, with ETIMEDOUT, instead of leaving a
thread (and a lock) behind forever."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

from .errors import AgentError

T = TypeVar("T")


class Deadline:
    """A point in (monotonic) time an op must be done by."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds

    def remaining(self) -> float:
        return max(0.0, self.at - time.monotonic())

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self.at

    def check(self, doing: str) -> None:
        """ETIMEDOUT when the time is up (``doing`` says what was being done)."""
        if self.expired:
            raise AgentError("ETIMEDOUT", f"timed out after {self.seconds:g} s {doing}")

    def acquire(self, lock: threading.Lock, doing: str) -> None:
        """Take ``lock`` before the deadline, or fail with ETIMEDOUT."""
        if not lock.acquire(timeout=self.remaining()):
            raise AgentError("ETIMEDOUT", f"timed out after {self.seconds:g} s waiting to start {doing}")


def call_with_deadline(function: Callable[[], T], deadline: Deadline, doing: str) -> T:
    """Run ``function`` (a syscall that may block in the kernel: FIFREEZE on a
    busy filesystem, a write to sysfs) in a thread, and stop waiting for it at
    the deadline. A call that is still blocked then finishes unobserved."""
    outcome: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(function())
        except BaseException as exc:  # noqa: BLE001 - re-raised in the waiting thread
            failure.append(exc)

    worker = threading.Thread(target=run, name=f"bounded: {doing}", daemon=True)
    worker.start()
    worker.join(deadline.remaining())
    if worker.is_alive():
        raise AgentError("ETIMEDOUT", f"timed out after {deadline.seconds:g} s {doing} (still pending)")
    if failure:
        raise failure[0]
    return outcome[0]
