"""Passwords, logins and the token secret (kiln.services.auth)."""

from __future__ import annotations

import stat
import threading
from pathlib import Path

import pytest
from unit.fakes import FakeHypervisor, FakeImageStore

from kiln.api.app import TOKEN_SECRET_FILE, create_app
from kiln.config import Settings
from kiln.services import auth
from kiln.services.errors import Unauthenticated
from kiln.services.users import UserService
from kiln.store.db import Database


@pytest.fixture
def verifications(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bool]]:
    """(stored hash, ran on the event loop's thread) of every verify_password call."""
    calls: list[tuple[str, bool]] = []
    loop_thread = threading.get_ident()
    real = auth.verify_password

    def counting(password: str, stored: str) -> bool:
        calls.append((stored, threading.get_ident() == loop_thread))
        return real(password, stored)

    monkeypatch.setattr(auth, "verify_password", counting)
    return calls


async def test_an_unknown_user_costs_one_verification_like_a_known_one(
    db: Database, verifications: list[tuple[str, bool]]
) -> None:
    users = UserService(db)
    known = await users.create_user("ivy", "right password")
    await users.create_user("no-password")  # a user with API keys only
    service = auth.AuthService(db, b"s" * 32, 60)
    for username in ("nobody", "no-password", "ivy"):
        with pytest.raises(Unauthenticated, match="incorrect username or password"):
            await service.login(username, "wrong")
    assert [stored for stored, _ in verifications] == [
        auth.dummy_password_hash(), auth.dummy_password_hash(), known.password_hash,
    ]  # fmt: skip
    # The right password, to the dummy hash, is still no login for a missing user.
    assert await service.login("ivy", "right password")
    assert not any(on_loop for _, on_loop in verifications), "scrypt ran on the event loop"


async def test_hashing_a_new_password_runs_off_the_event_loop(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[int] = []
    real = auth.hash_password

    def recording(password: str) -> str:
        threads.append(threading.get_ident())
        return real(password)

    monkeypatch.setattr(auth, "hash_password", recording)
    users = UserService(db)
    await users.create_user("jon", "pw")
    await users.set_password("jon", "pw2")
    assert len(threads) == 2 and threading.get_ident() not in threads


def test_a_token_secret_is_made_once_private_and_whole(tmp_path: Path) -> None:
    path = tmp_path / "data" / "token-secret"
    secret = auth.load_or_create_secret(path)
    assert len(secret) == auth.MIN_TOKEN_SECRET_BYTES
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert auth.load_or_create_secret(path) == secret
    assert [p.name for p in path.parent.iterdir()] == ["token-secret"]  # no temporary left


@pytest.mark.parametrize("content", ["", "\n", "not hex at all", "abcd", "00" * 31, "\x00\xff garbage"])
def test_an_unusable_token_secret_is_refused_with_what_to_do(tmp_path: Path, content: str) -> None:
    path = tmp_path / "token-secret"
    path.write_text(content, errors="surrogateescape")
    with pytest.raises(auth.InvalidTokenSecret, match=f"token secret in {path} .*remove the file"):
        auth.load_or_create_secret(path)
    assert path.read_text(errors="surrogateescape") == content  # never replaced behind the operator's back


def test_a_service_never_signs_with_a_short_secret(tmp_path: Path) -> None:
    for secret in (b"", b"short"):
        with pytest.raises(auth.InvalidTokenSecret):
            auth.AuthService(None, secret, 60)  # type: ignore[arg-type]


async def test_the_app_does_not_start_with_an_empty_secret(settings: Settings, tmp_path: Path) -> None:
    settings.data_dir.mkdir(parents=True)
    (settings.data_dir / TOKEN_SECRET_FILE).write_text("")
    app = create_app(settings, FakeHypervisor(), FakeImageStore(tmp_path / "images"))
    with pytest.raises(auth.InvalidTokenSecret):
        async with app.router.lifespan_context(app):
            pass


async def test_a_key_revoked_by_another_process_stops_within_the_cache_lifetime(db: Database) -> None:
    now = [1000.0]
    cache = auth.ApiKeyCache(clock=lambda: now[0])
    server = auth.AuthService(db, b"s" * 32, 60, cache)
    cli = UserService(db)  # the CLI's service: it cannot reach the server's cache
    owner = await cli.create_user("kim")
    created = await cli.create_api_key(owner.id)
    assert (await server.authenticate(created.key)).username == "kim"
    await cli.revoke_api_key(created.record.id)
    now[0] += auth.API_KEY_CACHE_SECONDS - 0.1
    assert (await server.authenticate(created.key)).username == "kim"  # still cached
    now[0] += 0.2
    with pytest.raises(Unauthenticated):
        await server.authenticate(created.key)
