"""Share routes over HTTP (fake runtime, no router process): shapes, tenancy, revocation, links."""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import parse_qs, urlsplit

from unit.harness import AppRunner, add_user, key_headers

from kiln.config import Settings
from kiln.crypto import links
from kiln.crypto.master_key import derive_key, load_master_key

SHARE_FIELDS = {"share_id", "id", "vm_id", "port", "is_public", "url", "status", "created_at", "revoked_at"}


async def test_a_vm_made_with_a_share_and_the_share_routes(
    run_app: AppRunner, admin_key: Callable[[], str], settings: Settings
) -> None:
    async with run_app() as client:
        auth = key_headers(admin_key())
        created = (await client.post("/v1/vms", json={"share": {"port": 3000, "is_public": True}}, headers=auth)).json()
        share = created["share"]
        assert set(share) == SHARE_FIELDS
        assert (share["vm_id"], share["port"], share["is_public"], share["status"]) == (
            created["vm_id"], 3000, True, "active",
        )  # fmt: skip
        assert share["url"] == f"http://{share['share_id']}.kiln.localhost:{settings.share_http_port}/"
        assert (await client.get(f"/v1/vms/{created['vm_id']}", headers=auth)).json()["share"] == share

        by_session = await client.post(
            "/v1/shares", json={"port": 8000, "session_id": created["session_id"]}, headers=auth
        )
        assert by_session.status_code == 200, by_session.text
        second = by_session.json()
        assert (second["vm_id"], second["is_public"]) == (created["vm_id"], False)
        listed = (await client.get("/v1/shares", headers=auth)).json()
        assert [s["share_id"] for s in listed] == [share["share_id"], second["share_id"]]

        private = await client.patch(f"/v1/shares/{share['share_id']}", json={"is_public": False}, headers=auth)
        assert private.json()["is_public"] is False
        revoked = (await client.patch(f"/v1/shares/{share['share_id']}", json={"revoke": True}, headers=auth)).json()
        assert revoked["status"] == "revoked" and revoked["revoked_at"] is not None
        # The VM record follows the share it was made with.
        assert (await client.get(f"/v1/vms/{created['vm_id']}", headers=auth)).json()["share"]["status"] == "revoked"
        back = await client.patch(f"/v1/shares/{share['share_id']}", json={"revoke": False}, headers=auth)
        assert back.status_code == 409

        deleted = await client.delete(f"/v1/shares/{share['share_id']}", headers=auth)
        assert deleted.json() == {"success": True, "share_id": share["share_id"]}
        assert (await client.get(f"/v1/shares/{share['share_id']}", headers=auth)).status_code == 404
        assert (await client.get(f"/v1/vms/{created['vm_id']}", headers=auth)).json()["share"] is None


async def test_another_users_shares_and_vms_are_404(
    run_app: AppRunner, admin_key: Callable[[], str], settings: Settings
) -> None:
    async with run_app() as client:
        auth = key_headers(admin_key())
        vm = (await client.post("/v1/vms", json={}, headers=auth)).json()
        share = (await client.post("/v1/shares", json={"port": 80, "vm_id": vm["vm_id"]}, headers=auth)).json()
        other = key_headers(await add_user(settings, "mallory"))
        theirs = await client.post("/v1/shares", json={"port": 80, "vm_id": vm["vm_id"]}, headers=other)
        assert theirs.status_code == 404
        for method, body in (("GET", None), ("PATCH", {"revoke": True}), ("DELETE", None)):
            answer = await client.request(method, f"/v1/shares/{share['share_id']}", json=body, headers=other)
            assert answer.status_code == 404, (method, answer.text)
        assert (await client.post(f"/v1/shares/{share['share_id']}/link", json={}, headers=other)).status_code == 404
        assert (await client.get("/v1/shares", headers=other)).json() == []
        assert (await client.get(f"/v1/shares/{share['share_id']}", headers=auth)).json()["status"] == "active"


async def test_bad_share_requests_are_4xx(run_app: AppRunner, admin_key: Callable[[], str]) -> None:
    async with run_app() as client:
        auth = key_headers(admin_key())
        vm = (await client.post("/v1/vms", json={}, headers=auth)).json()
        nameless = await client.post("/v1/shares", json={"port": 80}, headers=auth)
        assert nameless.status_code == 422 and nameless.json()["detail"][0]["loc"] == ["body", "vm_id"]
        empty = await client.post("/v1/shares", json={"port": 80, "vm_id": ""}, headers=auth)  # was a 500 (the fuzz)
        assert empty.status_code == 422 and empty.json()["detail"][0]["loc"] == ["body", "vm_id"]
        port_zero = await client.post("/v1/shares", json={"port": 0, "vm_id": vm["vm_id"]}, headers=auth)
        assert port_zero.status_code == 422
        await client.delete(f"/v1/vms/{vm['vm_id']}", headers=auth)
        ended = await client.post("/v1/shares", json={"port": 80, "vm_id": vm["vm_id"]}, headers=auth)
        assert ended.status_code == 409 and "terminated" in ended.json()["detail"]
        assert (await client.post("/v1/shares", json={"port": 80}, headers={})).status_code == 401


async def test_signed_links_name_their_share_and_expire(
    run_app: AppRunner, admin_key: Callable[[], str], settings: Settings
) -> None:
    async with run_app() as client:
        auth = key_headers(admin_key())
        vm = (await client.post("/v1/vms", json={"share": {"port": 5000}}, headers=auth)).json()
        share_id = vm["share"]["share_id"]
        link = (await client.post(f"/v1/shares/{share_id}/link", json={"expires_in": 60}, headers=auth)).json()
        token = parse_qs(urlsplit(link["url"]).query)["kiln_share_token"][0]
        key = derive_key(load_master_key(settings.data_dir, create=False), links.PURPOSE)
        assert links.verify(key, token, share_id) is not None
        assert links.verify(key, token, "shr-someotherone") is None
        assert links.verify(key, token, share_id, now=10**12) is None
        too_long = await client.post(f"/v1/shares/{share_id}/link", json={"expires_in": 10**9}, headers=auth)
        assert too_long.status_code == 422
        await client.patch(f"/v1/shares/{share_id}", json={"revoke": True}, headers=auth)
        assert (await client.post(f"/v1/shares/{share_id}/link", json={}, headers=auth)).status_code == 409


async def test_app_url_makes_or_finds_a_private_share(run_app: AppRunner, admin_key: Callable[[], str]) -> None:
    async with run_app() as client:
        auth = key_headers(admin_key())
        vm = (await client.post("/v1/vms", json={}, headers=auth)).json()
        first = (await client.get(f"/v1/sessions/app-url/{vm['session_id']}", headers=auth)).json()
        assert (first["port"], first["is_public"]) == (80, False) and first["share_id"] in first["url"]
        again = (await client.get(f"/v1/sessions/app-url/{vm['session_id']}", headers=auth)).json()
        assert again == first
        other_port = (await client.get(f"/v1/sessions/app-url/{vm['session_id']}?port=8080", headers=auth)).json()
        assert other_port["share_id"] != first["share_id"]
        assert (await client.get("/v1/sessions/app-url/nope", headers=auth)).status_code == 404


async def test_auto_suspend_and_resume_are_taken_at_create_but_not_in_the_seed_schema(
    run_app: AppRunner, admin_key: Callable[[], str]
) -> None:
    async with run_app() as client:
        auth = key_headers(admin_key())
        vm = (await client.post("/v1/vms", json={"auto_suspend": True, "auto_resume": True}, headers=auth)).json()
        record = (await client.get(f"/v1/vms/{vm['vm_id']}", headers=auth)).json()
        assert (record["auto_suspend"], record["auto_resume"]) == (True, True)
        schema = (await client.get("/openapi.json")).json()["components"]["schemas"]["VMCreateRequest"]
        assert "auto_suspend" not in schema["properties"] and "auto_resume" not in schema["properties"]
