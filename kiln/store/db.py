"""Engine, sessions and schema migrations.

SQLite (the default) runs in WAL mode with a busy timeout, so the CLI can add
users and keys while a server holds the same file open. PostgreSQL is used when
the URL says ``postgresql+asyncpg://``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 10_000


def _enable_sqlite_wal(dbapi_connection: Any, connection_record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_query_only(dbapi_connection: Any, connection_record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA query_only=ON")
    cursor.close()


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config(str(MIGRATIONS_DIR / "alembic.ini"))
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # env.py migrates this connection instead of opening its own engine.
    config.attributes["connection"] = connection
    return config


def _private_database_file(path: Path) -> None:
    """The SQLite file, readable by its owner only (0600): SQLite makes its
    -wal and -shm files with the database file's mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        if file.exists():
            file.chmod(0o600)


class Database:
    """``read_only``: every connection refuses writes (the share router's: it only looks up)."""

    def __init__(self, url: str, *, read_only: bool = False) -> None:
        self.url = make_url(url)
        if self.url.get_backend_name() == "sqlite" and self.url.database:
            _private_database_file(Path(self.url.database))
        sqlite = self.url.get_backend_name() == "sqlite"
        # Pre-ping (a SELECT 1 per checkout) finds connections a PostgreSQL server
        # dropped; a SQLite file has no server to drop them, so there it is only
        # one more round trip through aiosqlite's thread on every transaction.
        connect_args: dict[str, Any] = {}
        if read_only and not sqlite:
            connect_args["server_settings"] = {"default_transaction_read_only": "on"}
        self.engine: AsyncEngine = create_async_engine(
            self.url, pool_pre_ping=not sqlite, connect_args=connect_args
        )
        if sqlite:
            event.listen(self.engine.sync_engine, "connect", _enable_sqlite_wal)
            if read_only:
                event.listen(self.engine.sync_engine, "connect", _sqlite_query_only)
        self._sessions = async_sessionmaker(self.engine, expire_on_commit=False)

    async def migrate(self) -> None:
        """Bring the schema to the newest revision (idempotent)."""

        def upgrade(connection: Connection) -> None:
            command.upgrade(alembic_config(connection), "head")

        async with self.engine.begin() as connection:
            await connection.run_sync(upgrade)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """A session inside one transaction: committed on success, rolled back on error."""
        async with self._sessions() as session, session.begin():
            yield session

    async def close(self) -> None:
        await self.engine.dispose()
