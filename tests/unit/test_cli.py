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
from kiln.services.errors import Unauthenticated
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


def test_keys_ls_and_revoke() -> None:
    assert runner.invoke(app, ["users", "create", "gina"]).exit_code == 0
    first = runner.invoke(app, ["keys", "create", "--user", "gina", "--name", "laptop"]).stdout.split()[-1]
    second = runner.invoke(app, ["keys", "create", "--user", "gina", "--name", "ci"]).stdout.split()[-1]
    listed = runner.invoke(app, ["keys", "ls", "--user", "gina"], terminal_width=200)
    assert listed.exit_code == 0, listed.output
    assert "laptop" in listed.stdout and "ci" in listed.stdout
    assert first not in listed.stdout and second not in listed.stdout
    assert first[:12] in listed.stdout  # the prefix, to tell keys apart

    key_id = next(line.split()[1] for line in listed.stdout.splitlines() if "laptop" in line)
    revoked = runner.invoke(app, ["keys", "revoke", key_id])
    assert revoked.exit_code == 0, revoked.output
    assert "within 5 s" in " ".join(revoked.output.split())
    with pytest.raises(Unauthenticated):
        owner_of(first)
    assert owner_of(second) == "gina"
    again = runner.invoke(app, ["keys", "revoke", key_id])
    assert again.exit_code == 1 and "not found" in again.output
    assert runner.invoke(app, ["keys", "ls", "--user", "nobody"]).exit_code == 1


def login(username: str, password: str) -> bool:
    async def attempt() -> bool:
        db = Database(get_settings().database)
        try:
            await AuthService(db, b"x" * 32, 60).login(username, password)
            return True
        except Unauthenticated:
            return False
        finally:
            await db.close()

    return asyncio.run(attempt())


def test_users_passwd_from_stdin_or_a_prompt() -> None:
    assert runner.invoke(app, ["users", "create", "hank"]).exit_code == 0
    assert not login("hank", "first")
    changed = runner.invoke(app, ["users", "passwd", "hank", "--password-stdin"], input="first\n")
    assert changed.exit_code == 0, changed.output
    assert login("hank", "first")
    prompted = runner.invoke(app, ["users", "passwd", "hank"], input="second\nsecond\n")
    assert prompted.exit_code == 0, prompted.output
    assert "second" not in prompted.output  # not echoed
    assert login("hank", "second") and not login("hank", "first")
    mismatch = runner.invoke(app, ["users", "passwd", "hank"], input="third\nother\n")
    assert mismatch.exit_code != 0 and login("hank", "second")
    empty = runner.invoke(app, ["users", "passwd", "hank", "--password-stdin"], input="\n")
    assert empty.exit_code == 1 and "no password" in empty.output
    unknown = runner.invoke(app, ["users", "passwd", "nobody", "--password-stdin"], input="pw\n")
    assert unknown.exit_code == 1 and "not found" in unknown.output


def test_serve_refuses_a_broken_package_manager_file_before_it_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data_dir: Path
) -> None:
    broken = tmp_path / "pm.toml"
    broken.write_text("[pip\n")
    monkeypatch.setenv("KILN_EGRESS_PACKAGE_MANAGERS_FILE", str(broken))
    get_settings.cache_clear()
    result = runner.invoke(app, ["serve", "--port", "1"])
    assert result.exit_code == 1
    printed = "".join(result.output.split())  # the console may wrap long lines
    assert "isnotTOML" in printed and str(broken) in printed
