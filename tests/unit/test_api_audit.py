"""The audit log over HTTP (fake runtime): a VM's life in order, cursor pages,
filters, refusals, tenancy (another user's events are a 404), bad input 422."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from unit.fakes import FakeHypervisor, boot_error
from unit.harness import AppRunner, add_user, key_headers

from kiln.config import Settings

EVENT_FIELDS = {
    "id", "event_group", "event_type", "status", "user_id", "actor_type", "actor_id", "vm_id",
    "session_id", "resource_type", "resource_id", "event_payload", "error_message", "created_at",
}  # fmt: skip


async def all_events(client, auth: dict[str, str], **filters: object) -> list[dict]:  # type: ignore[no-untyped-def]
    """Every page, oldest first."""
    items: list[dict] = []
    cursor = None
    while True:
        params = {**filters, "limit": 2, **({"cursor": cursor} if cursor else {})}
        page = await client.get("/v1/audit/events", params=params, headers=auth)
        assert page.status_code == 200, page.text
        body = page.json()
        assert set(body) == {"items", "next_cursor"}
        assert len(body["items"]) <= 2
        items.extend(body["items"])
        cursor = body["next_cursor"]
        if cursor is None:
            return list(reversed(items))


async def test_a_vms_life_is_in_the_log_in_order_across_pages(run_app: AppRunner, admin_key: Callable[[], str]) -> None:
    async with run_app() as client:
        auth = key_headers(admin_key())
        vm_id = (await client.post("/v1/vms", json={}, headers=auth)).json()["vm_id"]
        assert (await client.patch(f"/v1/vms/{vm_id}", json={"metadata": {"a": "b"}}, headers=auth)).status_code == 200
        # The fake hypervisor cannot save: the suspend fails and the VM runs on.
        assert (await client.post(f"/v1/vms/{vm_id}/suspend", headers=auth)).status_code == 409
        assert (await client.delete(f"/v1/vms/{vm_id}", headers=auth)).status_code == 200

        events = await all_events(client, auth, vm_id=vm_id)
        assert [event["event_type"] for event in events] == [
            "vm.created", "vm.running", "vm.updated", "vm.suspending", "vm.running", "vm.terminating",
            "vm.terminated",
        ]  # fmt: skip
        assert all(set(event) == EVENT_FIELDS for event in events)
        ids = [int(event["id"]) for event in events]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)
        created = events[0]
        assert (created["event_group"], created["status"], created["actor_type"]) == ("vm", "success", "user")
        assert created["event_payload"]["from_pool"] is False and created["session_id"]
        assert events[2]["event_payload"] == {"fields": ["metadata"]}
        assert events[4]["event_payload"]["suspend_failed"] is True

        one = await client.get(f"/v1/audit/events/{created['id']}", headers=auth)
        assert one.json() == created


async def test_a_failed_boot_says_why(
    run_app: AppRunner, admin_key: Callable[[], str], hypervisor: FakeHypervisor
) -> None:
    async with run_app() as client:
        auth = key_headers(admin_key())
        hypervisor.start_error = boot_error("the kernel panicked")
        refused = await client.post("/v1/vms", json={}, headers=auth)
        assert refused.status_code == 503
        failed = (await client.get("/v1/audit/events", params={"event_type": "vm.failed"}, headers=auth)).json()
        [event] = failed["items"]
        assert event["status"] == "failure" and "the kernel panicked" in event["error_message"]


async def test_refusals_and_failed_logins_are_events(
    run_app: AppRunner, admin_key: Callable[[], str], settings: Settings
) -> None:
    settings.quota_vms = 1
    async with run_app() as client:
        await add_user(settings, "alice", "correct horse")
        auth = key_headers(admin_key())
        assert (await client.post("/v1/vms", json={}, headers=auth)).status_code == 200
        assert (await client.post("/v1/vms", json={}, headers=auth)).status_code == 429
        bad = await client.post("/v1/auth/token", data={"username": "alice", "password": "wrong"})
        assert bad.status_code == 401
        denied = (await client.get("/v1/audit/events", params={"status": "denied"}, headers=auth)).json()["items"]
        # (The calls themselves, api.call, are denied too; these are what they were refused for.)
        login, quota = [event for event in denied if event["event_group"] != "api"]
        assert login["event_type"] == "auth.login_failed" and login["event_payload"] == {"username": "alice"}
        assert "wrong" not in str(login)
        assert quota["event_type"] == "quota.refused" and "KILN_QUOTA_VMS" in quota["error_message"]
        groups = (await client.get("/v1/audit/events", params={"event_group": "quota"}, headers=auth)).json()
        assert [event["id"] for event in groups["items"]] == [quota["id"]]


async def test_users_see_their_own_events_and_the_admin_sees_all(
    run_app: AppRunner, admin_key: Callable[[], str], settings: Settings
) -> None:
    async with run_app() as client:
        alice = key_headers(await add_user(settings, "alice"))
        admin = key_headers(admin_key())
        alices_vm = (await client.post("/v1/vms", json={}, headers=alice)).json()["vm_id"]
        (await client.post("/v1/vms", json={}, headers=admin)).json()

        mine = await all_events(client, alice)
        assert {event["vm_id"] for event in mine if event["vm_id"]} == {alices_vm}
        assert {event["user_id"] for event in mine} == {mine[0]["user_id"]}
        everyone = await all_events(client, admin)
        assert len({event["user_id"] for event in everyone}) == 2
        admins_event = next(event for event in everyone if event["user_id"] != mine[0]["user_id"])
        assert (await client.get(f"/v1/audit/events/{admins_event['id']}", headers=alice)).status_code == 404
        # Filtering by another user's id shows a user nothing of theirs.
        other = await client.get("/v1/audit/events", params={"user_id": admins_event["user_id"]}, headers=alice)
        assert other.json() == {"items": [], "next_cursor": None}
        assert (await client.get("/v1/audit/events")).status_code == 401


async def test_bad_filters_are_refused_by_name(run_app: AppRunner, admin_key: Callable[[], str]) -> None:
    async with run_app() as client:
        auth = key_headers(admin_key())
        for params, loc in (
            ({"event_kind": "vm"}, ["query", "event_kind"]),
            ({"status": "maybe"}, ["query", "status"]),
            ({"event_group": "nope"}, ["query", "event_group"]),
            ({"cursor": "abc"}, ["query", "cursor"]),
            ({"limit": 0}, ["query", "limit"]),
            ({"limit": 201}, ["query", "limit"]),
        ):
            answer = await client.get("/v1/audit/events", params=params, headers=auth)
            assert answer.status_code == 422, (params, answer.text)
            assert answer.json()["detail"][0]["loc"] == loc
        assert (await client.get("/v1/audit/events/abc", headers=auth)).status_code == 422
        assert (await client.get("/v1/audit/events/999999", headers=auth)).status_code == 404
        catalog = (await client.get("/v1/audit/catalog", headers=auth)).json()["catalog"]
        assert "vm.failed" in catalog["vm"] and "auth.login_failed" in catalog["auth"]
        assert catalog["volume"] == ["volume.attached", "volume.detached"]
        assert catalog["vault"] == ["vault.credential_used"]


async def test_every_mutating_call_is_recorded_with_its_route_and_status(
    run_app: AppRunner, admin_key: Callable[[], str]
) -> None:
    async with run_app() as client:
        auth = key_headers(admin_key())
        vm_id = (await client.post("/v1/vms", json={}, headers=auth)).json()["vm_id"]
        assert (await client.delete(f"/v1/vms/{vm_id}?x=secret", headers=auth)).status_code == 200
        assert (await client.post("/v1/vms", json={"vcpu_count": 99}, headers=auth)).status_code == 422
        assert (await client.post("/v1/vms", json={})).status_code == 401
        deadline = time.monotonic() + 30
        while True:  # the call log writes once a second
            calls = await all_events(client, auth, event_type="api.call")
            if len(calls) >= 4 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        seen = [
            (e["event_payload"]["method"], e["event_payload"]["route"], e["event_payload"]["status_code"], e["status"])
            for e in calls
        ]
        assert seen == [
            ("POST", "/v1/vms", 200, "success"),
            ("DELETE", "/v1/vms/{vm_id}", 200, "success"),
            ("POST", "/v1/vms", 422, "failure"),
            ("POST", "/v1/vms", 401, "denied"),
        ]
        assert "secret" not in str(calls)
        assert calls[0]["actor_type"] == "user" and calls[3]["actor_type"] == "anonymous"
        assert calls[3]["user_id"] is None
