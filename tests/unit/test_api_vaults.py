"""Vault routes over HTTP with the fake runtime (no network): shapes, rules,
tenancy, binding VMs, and the value sealed at rest and never answered or logged."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
from unit.harness import AppRunner, add_user, key_headers

from kiln.config import Settings

VALUE = "sk-unit-4be1c2d9f0a7"


async def make_vault(client, auth: dict, name: str = "team") -> str:  # type: ignore[no-untyped-def]
    response = await client.post("/v1/vaults", json={"name": name, "description": "d"}, headers=auth)
    assert response.status_code == 200, response.text
    return response.json()["id"]


async def test_a_vault_its_credentials_and_services(
    run_app: AppRunner, admin_key: Callable[[], str], settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with run_app() as client:
        auth = key_headers(admin_key())
        created = await client.post("/v1/vaults", json={"name": "team"}, headers=auth)
        vault = created.json()
        assert set(vault) == {"id", "vault_id", "name", "description", "created_at", "updated_at"}
        vault_id = vault["id"]
        assert vault["vault_id"] == vault_id and vault_id.startswith("vault_")

        added = await client.post(
            f"/v1/vaults/{vault_id}/credentials", json={"name": "ECHO_KEY", "value": VALUE}, headers=auth
        )
        assert added.status_code == 200, added.text
        credential = added.json()
        assert credential["credential_type"] == "api_key" and "value" not in credential
        duplicate = await client.post(
            f"/v1/vaults/{vault_id}/credentials", json={"name": "ECHO_KEY", "value": "x"}, headers=auth
        )
        assert duplicate.status_code == 409

        service = await client.post(
            f"/v1/vaults/{vault_id}/services",
            json={"host": "*.Echo.test", "auth_config": {"type": "bearer", "token": "ECHO_KEY"}},
            headers=auth,
        )
        assert service.status_code == 200, service.text
        assert service.json() | {"id": "-", "service_id": "-", "created_at": "-"} == {
            "id": "-", "service_id": "-", "vault_id": vault_id, "host": "*.echo.test",
            "auth_config": {"type": "bearer", "token": "ECHO_KEY"}, "enabled": True, "description": None,
            "template_id": None, "credential": "ECHO_KEY", "credential_present": True, "created_at": "-",
        }  # fmt: skip
        again = await client.post(
            f"/v1/vaults/{vault_id}/services",
            json={"host": "*.echo.test", "auth_config": {"type": "header", "header": "X-K", "key": "ECHO_KEY"}},
            headers=auth,
        )
        assert again.status_code == 409

        rotated = await client.post(
            f"/v1/vaults/{vault_id}/credentials/{credential['id']}/rotate", json={"value": VALUE + "-2"}, headers=auth
        )
        assert rotated.status_code == 200 and rotated.json()["rotated_at"] is not None

        discovered = (await client.get(f"/v1/vaults/{vault_id}/discover", headers=auth)).json()
        assert discovered["hosts"] == ["*.echo.test"]
        assert discovered["credentials"] == [{"id": credential["id"], "name": "ECHO_KEY", "credential_type": "api_key"}]

        listed = await client.get(f"/v1/vaults/{vault_id}/credentials", headers=auth)
        assert [c["name"] for c in listed.json()["credentials"]] == ["ECHO_KEY"]
        logs = await client.get(f"/v1/vaults/{vault_id}/request-logs", params={"limit": 5}, headers=auth)
        assert logs.json() == {"logs": []}

        # A deleted credential leaves its service, which then injects nothing.
        gone = await client.delete(f"/v1/vaults/{vault_id}/credentials/{credential['id']}", headers=auth)
        assert gone.json() == {"success": True}
        (left,) = (await client.get(f"/v1/vaults/{vault_id}/services", headers=auth)).json()["services"]
        assert left["credential_present"] is False
        assert (await client.get(f"/v1/vaults/{vault_id}/discover", headers=auth)).json()["hosts"] == []

        everything = [r.text for r in (created, added, service, rotated, listed, logs)]
    database = (settings.data_dir / "kiln.db").read_bytes()
    assert VALUE.encode() not in database, "a credential value is in the database in the clear"
    assert all(VALUE not in text for text in everything)
    assert VALUE not in caplog.text


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"name": "K", "value": "hunter2\nbreak"}, ["body", "value"]),
        ({"name": "K", "value": " hunter2"}, ["body", "value"]),
        ({"name": "K", "value": ""}, ["body", "value"]),
        ({"name": "bad name", "value": "hunter2"}, ["body", "name"]),
        ({"name": "K", "value": "hunter2" * 1300}, ["body", "value"]),
    ],
)
async def test_bad_credentials_are_422_without_their_value(
    run_app: AppRunner, admin_key: Callable[[], str], body: dict, loc: list
) -> None:
    async with run_app() as client:
        auth = key_headers(admin_key())
        vault_id = await make_vault(client, auth)
        response = await client.post(f"/v1/vaults/{vault_id}/credentials", json=body, headers=auth)
    assert response.status_code == 422
    assert [problem["loc"] for problem in response.json()["detail"]] == [loc]
    assert "hunter2" not in response.text


@pytest.mark.parametrize(
    ("body", "loc", "words"),
    [
        ({"host": "1.2.3.4", "auth_config": {"type": "bearer", "token": "K"}}, ["body", "host"], "not a host"),
        ({"host": "*.*.x.com", "auth_config": {"type": "bearer", "token": "K"}}, ["body", "host"], "wildcard"),
        ({"host": "a.com", "auth_config": {"type": "bearer", "token": "NOPE"}}, ["body", "auth_config", "token"],
         "no credential named 'NOPE'"),
        ({"host": "a.com", "auth_config": {"type": "url-path", "token": "K"}}, ["body", "auth_config", "type"],
         "'url-path' is not supported yet"),
        ({"host": "a.com", "auth_config": {"type": "header", "key": "K"}}, ["body", "auth_config", "header"],
         "header"),
    ],
)  # fmt: skip
async def test_bad_services_are_422_naming_the_field(
    run_app: AppRunner, admin_key: Callable[[], str], body: dict, loc: list, words: str
) -> None:
    async with run_app() as client:
        auth = key_headers(admin_key())
        vault_id = await make_vault(client, auth)
        await client.post(f"/v1/vaults/{vault_id}/credentials", json={"name": "K", "value": "v"}, headers=auth)
        response = await client.post(f"/v1/vaults/{vault_id}/services", json=body, headers=auth)
    assert response.status_code == 422, response.text
    (problem,) = response.json()["detail"]
    assert problem["loc"] == loc and words in problem["msg"]


async def test_the_catalog_and_services_from_templates(run_app: AppRunner, admin_key: Callable[[], str]) -> None:
    async with run_app() as client:
        auth = key_headers(admin_key())
        templates = (await client.get("/v1/vaults/catalog", headers=auth)).json()["templates"]
        openai = next(t for t in templates if t["id"] == "openai")
        assert (openai["host"], openai["auth_type"], openai["credential_key"]) == (
            "api.openai.com", "bearer", "OPENAI_API_KEY",
        )  # fmt: skip
        vault_id = await make_vault(client, auth)
        missing = await client.post(
            f"/v1/vaults/{vault_id}/services:from_template", json={"template_ids": ["openai"]}, headers=auth
        )
        assert missing.status_code == 422 and "OPENAI_API_KEY" in missing.text
        unknown = await client.post(
            f"/v1/vaults/{vault_id}/services:from_template", json={"template_ids": ["nope"]}, headers=auth
        )
        assert unknown.status_code == 422 and "unknown template 'nope'" in unknown.text
        for name in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY"):
            await client.post(f"/v1/vaults/{vault_id}/credentials", json={"name": name, "value": "v"}, headers=auth)
        made = await client.post(
            f"/v1/vaults/{vault_id}/services:from_template",
            json={"template_ids": ["openai", "anthropic"]},
            headers=auth,
        )
        assert made.status_code == 200, made.text
        services = made.json()["services"]
        assert [(s["host"], s["template_id"], s["auth_config"]) for s in services] == [
            ("api.openai.com", "openai", {"type": "bearer", "token": "OPENAI_API_KEY"}),
            ("api.anthropic.com", "anthropic", {"type": "api-key", "header": "x-api-key", "key": "ANTHROPIC_API_KEY"}),
        ]  # fmt: skip


async def test_another_users_vault_is_404_everywhere(
    run_app: AppRunner, admin_key: Callable[[], str], settings: Settings
) -> None:
    async with run_app() as client:
        auth = key_headers(admin_key())
        vault_id = await make_vault(client, auth)
        credential = (
            await client.post(f"/v1/vaults/{vault_id}/credentials", json={"name": "K", "value": "v"}, headers=auth)
        ).json()
        stranger = key_headers(await add_user(settings, "stranger"))
        assert (await client.get("/v1/vaults", headers=stranger)).json() == {"vaults": []}
        base = f"/v1/vaults/{vault_id}"
        for method, path, body in [
            ("GET", base, None), ("PATCH", base, {"name": "mine"}), ("DELETE", base, None),
            ("GET", f"{base}/discover", None), ("GET", f"{base}/credentials", None),
            ("POST", f"{base}/credentials", {"name": "X", "value": "v"}),
            ("POST", f"{base}/credentials/{credential['id']}/rotate", {"value": "stolen"}),
            ("DELETE", f"{base}/credentials/{credential['id']}", None), ("GET", f"{base}/services", None),
            ("POST", f"{base}/services", {"host": "a.com", "auth_config": {"type": "bearer", "token": "K"}}),
            ("POST", f"{base}/services:from_template", {"template_ids": ["openai"]}),
            ("GET", f"{base}/request-logs", None),
        ]:  # fmt: skip
            response = await client.request(method, path, json=body, headers=stranger)
            assert response.status_code == 404, (method, path, response.text)
        # Nor may a stranger's VM name it.
        response = await client.post("/v1/vms", json={"vault_ids": [vault_id]}, headers=stranger)
        assert response.status_code == 422
        assert response.json()["detail"] == [
            {"loc": ["body", "vault_ids", 0], "msg": f"vault {vault_id} not found", "type": "value_error"}
        ]
        assert (await client.get(base, headers=auth)).json()["name"] == "team"  # untouched


async def test_vms_name_their_vaults_and_lose_a_deleted_one(run_app: AppRunner, admin_key: Callable[[], str]) -> None:
    async with run_app() as client:
        auth = key_headers(admin_key())
        first, second = await make_vault(client, auth, "a"), await make_vault(client, auth, "b")
        created = await client.post("/v1/vms", json={"vault_ids": [first, first, second]}, headers=auth)
        assert created.status_code == 200, created.text
        vm_id = created.json()["vm_id"]
        assert (await client.get(f"/v1/vms/{vm_id}", headers=auth)).json()["vault_ids"] == [first, second]
        patched = await client.patch(f"/v1/vms/{vm_id}", json={"vault_ids": [second]}, headers=auth)
        assert patched.status_code == 200 and patched.json()["vault_ids"] == [second]
        refused = await client.patch(f"/v1/vms/{vm_id}", json={"vault_ids": ["vault_nope"]}, headers=auth)
        assert refused.status_code == 422 and "vault vault_nope not found" in refused.text
        await client.delete(f"/v1/vaults/{second}", headers=auth)
        assert (await client.get(f"/v1/vms/{vm_id}", headers=auth)).json()["vault_ids"] == []
        assert (await client.get(f"/v1/vaults/{second}", headers=auth)).status_code == 404
