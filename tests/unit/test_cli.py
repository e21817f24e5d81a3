"""The database-side CLI commands: users and keys, before and next to a server."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kiln.cli import app
from kiln.config import get_settings
from kiln.services.auth import AuthService
from kiln.store.db import Database

runner = CliRunner()


@pytest.fixture(autouse=True)
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("KILN_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.delenv("KILN_DATABASE_URL", raising=False)
    get_settings.cache_clear()  # settings are read once per process otherwise
    yield tmp_path / "var"
    get_settings.cache_clear()


def owner_of(key: str) -> str:
    async def lookup() -> str:
        db = Database(get_settings().database)
        try:
            return (await AuthService(db, b"x" * 32, 60).authenticate(key)).username
        finally:
            await db.close()

    return asyncio.run(lookup())


def test_users_and_keys() -> None:
    created = runner.invoke(app, ["users", "create", "erin", "--password-stdin"], input="pw\n")
    assert created.exit_code == 0, created.output
    assert created.stdout.strip().isdigit()

    key = runner.invoke(app, ["keys", "create", "--user", "erin"])
    assert key.exit_code == 0, key.output
    last_line = key.stdout.strip().splitlines()[-1]
    assert last_line.startswith("kiln_")
    assert owner_of(last_line) == "erin"


def test_errors_are_reported_not_raised() -> None:
    assert runner.invoke(app, ["users", "create", "frank"]).exit_code == 0
    duplicate = runner.invoke(app, ["users", "create", "frank"])
    assert duplicate.exit_code == 1
    assert "already exists" in duplicate.output
    unknown = runner.invoke(app, ["keys", "create", "--user", "nobody"])
    assert unknown.exit_code == 1
    assert "not found" in unknown.output


def test_vm_commands_need_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KILN_API_KEY", raising=False)
    result = runner.invoke(app, ["vm", "ls"])
    assert result.exit_code == 1
    assert "KILN_API_KEY" in result.output
