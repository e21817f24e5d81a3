"""Authentication and the account routes, over HTTP against an in-process app."""

from __future__ import annotations

import stat
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import jwt
from unit.harness import AppRunner, add_user, bearer_headers, key_headers

from kiln.api.app import TOKEN_SECRET_FILE
from kiln.config import Settings


async def test_first_start_creates_admin_and_a_private_key_file(
    run_app: AppRunner, settings: Settings, admin_key: Callable[[], str], capsys
) -> None:
    async with run_app() as client:
        key = admin_key()
        assert key.startswith("kiln_")
        assert key in capsys.readouterr().out
        key_file = settings.data_dir / "admin-api-key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        me = await client.get("/v1/users/me", headers=key_headers(key))
    assert me.status_code == 200
    assert me.json()["username"] == "admin"
    assert set(me.json()) == {"id", "username", "email", "name", "is_verified", "created_at"}

    # A second start neither makes another admin nor prints a key.
    async with run_app() as client:
        assert "kiln_" not in capsys.readouterr().out
        assert (await client.get("/v1/users/me", headers=key_headers(key))).status_code == 200


async def test_no_or_bad_credentials_are_401(run_app: AppRunner) -> None:
    async with run_app() as client:
        for headers in (
            {},
            key_headers("kiln_not-a-key"),
            bearer_headers("not.a.token"),
            {"Authorization": "Basic YWRtaW46YWRtaW4="},
        ):
            response = await client.get("/v1/vms", headers=headers)
            assert response.status_code == 401, headers
            assert response.headers["www-authenticate"] == "Bearer"
            assert isinstance(response.json()["detail"], str)


async def test_password_login_and_bearer_tokens(run_app: AppRunner, settings: Settings) -> None:
    async with run_app() as client:
        await add_user(settings, "carol", "s3cret password")
        wrong = await client.post(
            "/v1/auth/token", data={"username": "carol", "password": "nope"}
        )
        assert wrong.status_code == 401
        unknown = await client.post("/v1/auth/token", data={"username": "x", "password": "y"})
        assert unknown.status_code == 401

        response = await client.post(
            "/v1/auth/token", data={"username": "carol", "password": "s3cret password"}
        )
        assert response.status_code == 200
        assert response.json()["token_type"] == "bearer"
        token = response.json()["access_token"]

        me = await client.get("/v1/users/me", headers=bearer_headers(token))
        assert me.json()["username"] == "carol"
        # The SDK's way (X-API-Key) takes a token too, and a bearer may be an API key.
        assert (await client.get("/v1/vms", headers=key_headers(token))).status_code == 200


async def test_api_key_as_bearer(run_app: AppRunner, admin_key: Callable[[], str]) -> None:
    async with run_app() as client:
        me = await client.get("/v1/users/me", headers=bearer_headers(admin_key()))
    assert me.json()["username"] == "admin"


async def test_expired_and_forged_tokens_are_refused(
    run_app: AppRunner, settings: Settings
) -> None:
    async with run_app() as client:
        await add_user(settings, "dave", "pw")
        me = await client.get(
            "/v1/users/me",
            headers=bearer_headers(
                (
                    await client.post(
                        "/v1/auth/token", data={"username": "dave", "password": "pw"}
                    )
                ).json()["access_token"]
            ),
        )
        user_id = me.json()["id"]
        secret = bytes.fromhex((settings.data_dir / TOKEN_SECRET_FILE).read_text())
        past = datetime.now(UTC) - timedelta(hours=2)
        expired = jwt.encode(
            {"sub": str(user_id), "iat": past, "exp": past + timedelta(hours=1)}, secret, "HS256"
        )
        forged = jwt.encode(
            {"sub": str(user_id), "exp": datetime.now(UTC) + timedelta(hours=1)},
            b"a guessed secret".ljust(32, b"!"),
            "HS256",
        )
        for token in (expired, forged):
            response = await client.get("/v1/users/me", headers=bearer_headers(token))
            assert response.status_code == 401
            assert response.headers["www-authenticate"] == "Bearer"


async def test_api_keys_are_shown_once_and_can_be_revoked(
    run_app: AppRunner, admin_key: Callable[[], str], settings: Settings
) -> None:
    async with run_app() as client:
        admin = key_headers(admin_key())
        created = await client.post("/v1/api-keys/", json={"name": "ci"}, headers=admin)
        assert created.status_code == 200
        new_key = created.json()["key"]
        assert new_key.startswith(created.json()["prefix"])

        listed = (await client.get("/v1/api-keys/", headers=admin)).json()
        assert {key["name"] for key in listed} == {"admin", "ci"}
        assert all("key" not in key for key in listed)
        assert new_key not in (settings.data_dir / "kiln.db").read_bytes().decode("latin-1")

        assert (await client.get("/v1/users/me", headers=key_headers(new_key))).status_code == 200
        deleted = await client.delete(f"/v1/api-keys/{created.json()['id']}", headers=admin)
        assert deleted.json() == {"success": True}
        assert (await client.get("/v1/users/me", headers=key_headers(new_key))).status_code == 401
        again = await client.delete(f"/v1/api-keys/{created.json()['id']}", headers=admin)
        assert again.status_code == 404


async def test_keys_of_another_user_are_invisible(
    run_app: AppRunner, admin_key: Callable[[], str], settings: Settings
) -> None:
    async with run_app() as client:
        erin = key_headers(await add_user(settings, "erin"))
        admin_keys = (await client.get("/v1/api-keys/", headers=key_headers(admin_key()))).json()
        assert (await client.get("/v1/api-keys/", headers=erin)).json()[0]["name"] == "default"
        response = await client.delete(f"/v1/api-keys/{admin_keys[0]['id']}", headers=erin)
        assert response.status_code == 404
        assert (await client.get("/v1/users/me", headers=key_headers(admin_key()))).is_success
