"""The egress routes over HTTP (fake runtime, no networking on this host):
shapes, 422s naming the field, tenancy, and the VM record's network_error."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from unit.harness import AppRunner, add_user, key_headers

from kiln.config import Settings

POLICY_KEYS = {
    "vm_id", "session_id", "allow_package_managers", "allow_public_repos", "allow_http", "allow_https",
    "allowed_domains", "allowed_cidrs", "status", "network_error",
}  # fmt: skip
# What the instavm SDK's set_vm_egress / set_session_egress send, with its defaults.
SDK_BODY = {
    "allow_public_repos": True, "allow_http": True, "allow_https": True, "allowed_domains": [], "allowed_cidrs": [],
}  # fmt: skip
NO_NETWORK = "the host gives VMs no network, so this VM reaches nothing: guest networking is turned off"


async def test_get_and_set_through_both_routes(run_app: AppRunner, admin_key: Callable[[], str]) -> None:
    async with run_app() as client:
        auth = key_headers(admin_key())
        vm = (await client.post("/v1/vms", json={"session_id": "s1"}, headers=auth)).json()
        got = await client.get(f"/v1/egress/vm/{vm['vm_id']}", headers=auth)
        assert got.status_code == 200, got.text
        assert got.json() == {
            "vm_id": vm["vm_id"], "session_id": "s1", "allow_package_managers": False,
            "allow_public_repos": False, "allow_http": False, "allow_https": False, "allowed_domains": [],
            "allowed_cidrs": [], "status": "no_network", "network_error": None,
        }  # fmt: skip

        changed = await client.post("/v1/egress/session/s1", json=SDK_BODY, headers=auth)
        assert changed.status_code == 200, changed.text
        body = changed.json()
        assert set(body) == POLICY_KEYS
        assert (body["allow_package_managers"], body["allow_public_repos"]) == (True, True)
        assert body["network_error"].startswith(NO_NETWORK)
        assert (await client.get("/v1/egress/session/s1", headers=auth)).json() == body
        record = (await client.get(f"/v1/vms/{vm['vm_id']}", headers=auth)).json()
        assert record["network_error"] == body["network_error"]

        # The whole policy is replaced: keys left out are false or empty.
        again = await client.post(f"/v1/egress/vm/{vm['vm_id']}", json={"allowed_cidrs": ["203.0.113.7"]}, headers=auth)
        assert again.json()["allowed_cidrs"] == ["203.0.113.7"]
        assert again.json()["allow_package_managers"] is False and again.json()["allow_https"] is False

        await client.delete(f"/v1/vms/{vm['vm_id']}", headers=auth)
        ended = (await client.get(f"/v1/egress/vm/{vm['vm_id']}", headers=auth)).json()
        assert ended["status"] == "ended" and ended["allowed_cidrs"] == ["203.0.113.7"]
        refused = await client.post(f"/v1/egress/vm/{vm['vm_id']}", json={}, headers=auth)
        assert refused.status_code == 409, refused.text


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"surprise": True}, ["body", "surprise"]),
        ({"allow_http": "yes"}, ["body", "allow_http"]),
        ({"allowed_domains": "a.test"}, ["body", "allowed_domains"]),
        ({"allowed_cidrs": ["10.0.0.0/33"]}, ["body", "allowed_cidrs"]),
        ({"allowed_cidrs": ["2001:db8::/32"]}, ["body", "allowed_cidrs"]),
        ({"allowed_domains": ["http://a.test"], "allow_http": True}, ["body", "allowed_domains"]),
        ({"allow_package_managers": True, "allow_public_repos": False}, ["body", "allow_public_repos"]),
    ],
)
async def test_bad_policies_are_422_naming_the_key(
    run_app: AppRunner, admin_key: Callable[[], str], body: dict, loc: list[str]
) -> None:
    async with run_app() as client:
        auth = key_headers(admin_key())
        vm = (await client.post("/v1/vms", json={"egress_policy": {"allowed_cidrs": ["1.2.3.4"]}}, headers=auth)).json()
        response = await client.post(f"/v1/egress/vm/{vm['vm_id']}", json=body, headers=auth)
        assert response.status_code == 422, response.text
        assert [problem["loc"] for problem in response.json()["detail"]] == [loc]
        kept = (await client.get(f"/v1/egress/vm/{vm['vm_id']}", headers=auth)).json()
        assert kept["allowed_cidrs"] == ["1.2.3.4"]


async def test_create_takes_the_group_under_either_name_and_refuses_bad_policies(
    run_app: AppRunner, admin_key: Callable[[], str]
) -> None:
    async with run_app() as client:
        auth = key_headers(admin_key())
        created = await client.post("/v1/vms", json={"egress_policy": {"allow_public_repos": True}}, headers=auth)
        assert created.status_code == 200, created.text
        policy = (await client.get(f"/v1/egress/vm/{created.json()['vm_id']}", headers=auth)).json()
        assert policy["allow_package_managers"] is True
        # Checked even though this host has no networking: it may be enforced on a later start.
        bad = await client.post("/v1/vms", json={"egress_policy": {"allowed_cidrs": ["nope"]}}, headers=auth)
        assert bad.status_code == 422
        assert bad.json()["detail"][0]["loc"] == ["body", "egress_policy"]


async def test_another_users_vm_and_session_are_404(
    run_app: AppRunner, admin_key: Callable[[], str], settings: Settings
) -> None:
    async with run_app() as client:
        auth = key_headers(admin_key())
        vm = (await client.post("/v1/vms", json={"session_id": "mine"}, headers=auth)).json()
        other = key_headers(await add_user(settings, "mallory"))
        for path in (f"/v1/egress/vm/{vm['vm_id']}", "/v1/egress/session/mine", "/v1/egress/vm/vm-nope"):
            assert (await client.get(path, headers=other)).status_code == 404, path
            assert (await client.post(path, json={"allowed_cidrs": ["0.0.0.0/0"]}, headers=other)).status_code == 404
        assert (await client.get(f"/v1/egress/vm/{vm['vm_id']}", headers=auth)).json()["allowed_cidrs"] == []
        assert (await client.get("/v1/egress/session/mine")).status_code == 401
