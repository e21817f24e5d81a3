"""Background work a service starts and must stop with it: tasks that outlive
the request that started them, and passes run every so often (``Periodic``)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

log = logging.getLogger(__name__)


class BackgroundTasks:
    """Tasks that outlive the request that started them; ``stop`` cancels them."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def run(self, work: Coroutine[Any, Any, Any], what: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(work, name=what)
        self._tasks.add(task)

        def finished(done: asyncio.Task[Any]) -> None:
            self._tasks.discard(done)
            if not done.cancelled() and done.exception() is not None:
                log.debug("background %s failed: %s", what, done.exception())

        task.add_done_callback(finished)
        return task

    async def stop(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()


class Periodic:
    """``work`` run every ``seconds`` in a task of its own, until ``stop``. A pass
    that fails is logged and the next one runs on time. ``wait_first``: the first
    pass comes after one interval (what the server's start settles comes first)."""

    def __init__(
        self, what: str, work: Callable[[], Awaitable[object]], seconds: float, *, wait_first: bool = False
    ) -> None:
        self.what = what
        self._work = work
        self._seconds = seconds
        self._wait_first = wait_first
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._forever(), name=self.what)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _forever(self) -> None:
        if self._wait_first:
            await asyncio.sleep(self._seconds)
        while True:
            try:
                await self._work()
            except Exception:
                log.exception("%s: a pass failed", self.what)
            await asyncio.sleep(self._seconds)
