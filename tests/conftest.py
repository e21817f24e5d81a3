"""Fixtures shared by the unit and e2e tests of the control plane.

Every test gets its own data dir. The runtime is faked (``unit/fakes.py``): no
test here boots QEMU. Database-backed fixtures run against SQLite, and against
PostgreSQL too when ``KILN_TEST_POSTGRES_URL`` names one (otherwise those cases
are skipped, with the reason shown).
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from leftovers import HostState
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from unit.fakes import FakeHypervisor, FakeImageStore
from unit.harness import AppRunner

from kiln.api.app import ADMIN_KEY_FILE, create_app
from kiln.config import Settings
from kiln.store.db import Database

POSTGRES_URL_VARIABLE = "KILN_TEST_POSTGRES_URL"


async def reset_postgres(url: str) -> None:
    """Start from an empty database: drop everything an earlier test made."""
    engine = create_async_engine(url)
    async with engine.begin() as connection:
        await connection.execute(text("DROP SCHEMA public CASCADE"))
        await connection.execute(text("CREATE SCHEMA public"))
    await engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'kiln.db'}"
    url = os.environ.get(POSTGRES_URL_VARIABLE)
    if not url:
        pytest.skip(f"{POSTGRES_URL_VARIABLE} is not set: no PostgreSQL to test against")
    await reset_postgres(url)
    return url


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Database]:
    """A migrated database of each kind ``database_url`` gives."""
    database = Database(database_url)
    await database.migrate()
    yield database
    await database.close()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    data_dir = tmp_path / "var"
    return Settings(
        data_dir=data_dir,
        cache_dir=tmp_path / "cache",
        # Explicit, so a KILN_DATABASE_URL in the environment cannot leak in.
        database_url=f"sqlite+aiosqlite:///{data_dir / 'kiln.db'}",
        max_vms=8,
        max_memory_mb=4096,
        max_vcpus=16,
        boot_timeout_seconds=5,
        # The host's free memory is not the fakes': no floor refuses a fake VM.
        memory_floor_mb=0,
        memory_reclaim_floor_mb=0,
        # Service tests touch nothing of the host: no network (no nftables, no
        # egress daemon), no VM user or cgroups.
        networking="off",
        confinement="off",
        # Nor a share router process: the API's share rules are tested without one.
        share_router=False,
        # Nor an SSH gateway process (its tests run a real kiln serve).
        ssh_gateway=False,
    )


@pytest.fixture
async def db(settings: Settings) -> AsyncIterator[Database]:
    database = Database(settings.database)
    await database.migrate()
    yield database
    await database.close()


@pytest.fixture
def hypervisor() -> FakeHypervisor:
    return FakeHypervisor()


@pytest.fixture
def images(tmp_path: Path) -> FakeImageStore:
    return FakeImageStore(tmp_path / "images")


@pytest.fixture
def run_app(settings: Settings, hypervisor: FakeHypervisor, images: FakeImageStore) -> AppRunner:
    """``async with run_app() as client``: a started app (lifespan and all) and an
    httpx client of it. Call it again for a restart on the same data dir."""

    @asynccontextmanager
    async def running() -> AsyncIterator[httpx.AsyncClient]:
        app: FastAPI = create_app(settings, hypervisor=hypervisor, images=images)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://kiln") as client:
                yield client

    return running


@pytest.fixture
def admin_key(settings: Settings) -> Callable[[], str]:
    """The bootstrap admin's key, readable once an app has started."""
    return lambda: (settings.data_dir / ADMIN_KEY_FILE).read_text().strip()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """Under ``CI=true`` nothing may be skipped: a part missing on the CI host
    (QEMU, an image, PostgreSQL, a tool) is a failure of the run, not a pass."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("CI") == "true":
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true (a part this host must have is missing): {reason}"


def pytest_sessionstart(session: pytest.Session) -> None:
    before = HostState.now()
    # A cleanup registered first runs last: after the session fixtures' own cleanups.
    session.config.add_cleanup(lambda: report_leftovers(before))


def report_leftovers(before: HostState) -> None:
    """What the run left on the host (``tests/leftovers.py``), printed after everything ended."""
    added = HostState.now().added_since(before)
    if not added:
        return
    lines = ["left on the host since the run started (by this run, or by others beside it):"]
    for kind, names in added.items():
        lines += [f"  {kind}:"] + [f"    {name}" for name in names]
    print("\n".join(lines), file=sys.stderr)
