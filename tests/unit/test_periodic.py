"""``Periodic``: passes go on after a failing one, ``wait_first`` waits one
interval before the first, and ``stop`` ends the task."""

from __future__ import annotations

import asyncio
import logging

import pytest

from kiln.services.background import Periodic


async def test_a_failing_pass_is_logged_and_the_next_one_runs(caplog: pytest.LogCaptureFixture) -> None:
    passes: list[int] = []
    second = asyncio.Event()

    async def work() -> None:
        passes.append(len(passes))
        if len(passes) == 1:
            raise RuntimeError("the first pass breaks")
        second.set()

    periodic = Periodic("test-pass", work, 0.01)
    with caplog.at_level(logging.ERROR):
        periodic.start()
        await asyncio.wait_for(second.wait(), 10)
        await periodic.stop()
    assert passes[:2] == [0, 1]
    assert "test-pass: a pass failed" in caplog.text and "the first pass breaks" in caplog.text
    count = len(passes)
    await asyncio.sleep(0.05)
    assert len(passes) == count  # stopped: no pass after stop


async def test_wait_first_runs_nothing_before_one_interval() -> None:
    ran = asyncio.Event()

    async def work() -> None:
        ran.set()

    periodic = Periodic("waits", work, 3600, wait_first=True)
    periodic.start()
    await asyncio.sleep(0.05)
    assert not ran.is_set()
    await periodic.stop()
    await periodic.stop()  # twice is fine
