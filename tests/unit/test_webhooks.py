"""Webhooks over HTTP (fake VM runtime, a real HTTP receiver on loopback):
signatures the SDK's own ``webhooks.verify`` accepts, patterns, retries with
backoff up to ``max_retries``, replay, secret rotation, refused destinations,
tenancy and bad input."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from instavm.webhooks import WebhookVerificationError, verify
from unit.harness import AppRunner, add_user, key_headers
from webhook_receiver import receiver

from kiln.config import Settings
from kiln.services.webhooks.policy import address_allowed


@pytest.fixture
def fast(settings: Settings) -> Settings:
    """Loopback receivers allowed; retries and polls in tens of milliseconds."""
    settings.webhook_allow_private = True
    settings.webhook_poll_seconds = 0.05
    settings.webhook_retry_base_seconds = 0.05
    settings.webhook_retry_max_seconds = 0.2
    return settings


async def deliveries_until(
    client: httpx.AsyncClient, auth: dict[str, str], done: Callable[[list[dict[str, Any]]], bool], **params: Any
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 30
    while True:
        items = (await client.get("/v1/webhooks/deliveries", params=params, headers=auth)).json()["items"]
        if done(items) or time.monotonic() > deadline:
            return items
        await asyncio.sleep(0.05)


async def test_events_arrive_signed_as_the_sdk_verifies_them(
    run_app: AppRunner, admin_key: Callable[[], str], fast: Settings
) -> None:
    with receiver() as hook:
        async with run_app() as client:
            auth = key_headers(admin_key())
            made = await client.post(
                "/v1/webhooks/endpoints",
                json={"url": hook.url, "description": "ci", "event_patterns": ["vm.*"]},
                headers=auth,
            )
            assert made.status_code == 200, made.text
            endpoint = made.json()
            secret = endpoint["secret"]
            assert secret.startswith("whsec_") and endpoint["status"] == "active"
            assert endpoint["secret_hint"].endswith(secret[-4:])
            listed = (await client.get("/v1/webhooks/endpoints", headers=auth)).json()
            assert [item["id"] for item in listed] == [endpoint["id"]] and listed[0]["secret"] is None

            vm_id = (await client.post("/v1/vms", json={}, headers=auth)).json()["vm_id"]
            got = await hook.arrived(2)
            events = [verify(item.headers, item.body, secret) for item in got]
            assert [(event["event_type"], event["vm_id"]) for event in events] == [
                ("vm.created", vm_id),
                ("vm.running", vm_id),
            ]
            with pytest.raises(WebhookVerificationError):
                verify(got[0].headers, got[0].body, "whsec_not-the-secret")
            audit = (await client.get(f"/v1/audit/events/{events[0]['id']}", headers=auth)).json()
            assert {key: audit[key] for key in events[0]} == {**events[0], "created_at": audit["created_at"]}

            done = await deliveries_until(client, auth, lambda items: all(i["status"] == "succeeded" for i in items))
            assert [(item["event_type"], item["attempt_count"]) for item in done] == [
                ("vm.running", 1),
                ("vm.created", 1),
            ]
            assert done[0]["attempts"][0]["status_code"] == 200


async def test_a_receiver_that_fails_twice_gets_the_event_once_with_its_retries_listed(
    run_app: AppRunner, admin_key: Callable[[], str], fast: Settings
) -> None:
    with receiver(script=[500, 503]) as hook:
        async with run_app() as client:
            auth = key_headers(admin_key())
            endpoint = (
                await client.post(
                    "/v1/webhooks/endpoints",
                    json={"url": hook.url, "event_patterns": ["vm.created"], "max_retries": 3},
                    headers=auth,
                )
            ).json()
            await client.post("/v1/vms", json={}, headers=auth)
            [delivery] = await deliveries_until(client, auth, lambda items: items and items[0]["status"] != "pending")
            assert delivery["status"] == "succeeded"
            assert [attempt["status_code"] for attempt in delivery["attempts"]] == [500, 503, 200]
            assert delivery["attempt_count"] == 3 and "HTTP 503" in delivery["attempts"][1]["error"]
            assert [item.answered for item in hook.received] == [500, 503, 200]
            # Each attempt is signed afresh; the accepted one verifies, and is the same event.
            bodies = {json.loads(item.body)["id"] for item in hook.received}
            assert len(bodies) == 1
            verify(hook.received[-1].headers, hook.received[-1].body, endpoint["secret"])


async def test_retries_end_at_max_retries_and_a_replay_sends_again(
    run_app: AppRunner, admin_key: Callable[[], str], fast: Settings
) -> None:
    with receiver(script=[500, 500, 500]) as hook:
        async with run_app() as client:
            auth = key_headers(admin_key())
            body = {"url": hook.url, "event_patterns": ["vm.created"], "max_retries": 1, "timeout_seconds": 2}
            endpoint = (await client.post("/v1/webhooks/endpoints", json=body, headers=auth)).json()
            await client.post("/v1/vms", json={}, headers=auth)
            [failed] = await deliveries_until(client, auth, lambda items: items and items[0]["status"] == "failed")
            assert failed["status"] == "failed" and failed["attempt_count"] == 2
            assert len(hook.received) == 2

            replayed = await client.post(f"/v1/webhooks/deliveries/{failed['id']}/replay", headers=auth)
            assert replayed.status_code == 200 and replayed.json()["replay_of"] == failed["id"]
            again = await deliveries_until(
                client, auth, lambda items: items[0]["status"] != "pending", endpoint_id=endpoint["id"]
            )
            assert again[0]["id"] == replayed.json()["id"]
            # The replay's first attempt gets the script's third 500, its retry a 200.
            assert again[0]["status"] == "succeeded"
            assert [attempt["status_code"] for attempt in again[0]["attempts"]] == [500, 200]
            filtered = (await client.get("/v1/webhooks/deliveries", params={"status": "failed"}, headers=auth)).json()
            assert [item["id"] for item in filtered["items"]] == [failed["id"]]


async def test_rotate_test_and_verify(run_app: AppRunner, admin_key: Callable[[], str], fast: Settings) -> None:
    with receiver(script=[200, 200, 404]) as hook:
        async with run_app() as client:
            auth = key_headers(admin_key())
            endpoint = (await client.post("/v1/webhooks/endpoints", json={"url": hook.url}, headers=auth)).json()
            path = f"/v1/webhooks/endpoints/{endpoint['id']}"
            verified = (await client.post(f"{path}/verify", headers=auth)).json()
            assert verified == {"id": endpoint["id"], "status": "verified", "status_code": 200, "error": None}
            assert verify(hook.received[0].headers, hook.received[0].body, endpoint["secret"])["event_type"] == (
                "webhook.verify"
            )
            assert (await client.get(path, headers=auth)).json()["verified_at"] is not None

            rotated = (await client.post(f"{path}/rotate-secret", headers=auth)).json()
            assert rotated["secret"] != endpoint["secret"] and rotated["secret"].startswith("whsec_")
            queued = (await client.post(f"{path}/test", headers=auth)).json()
            assert queued["status"] == "pending" and queued["event"]["event_type"] == "webhook.test"
            [_, test] = await hook.arrived(2)
            assert verify(test.headers, test.body, rotated["secret"])["event_type"] == "webhook.test"
            with pytest.raises(WebhookVerificationError):
                verify(test.headers, test.body, endpoint["secret"])

            failed = (await client.post(f"{path}/verify", headers=auth)).json()
            assert failed["status"] == "failed" and failed["status_code"] == 404

            patched = await client.patch(path, json={"enabled": False, "description": "off"}, headers=auth)
            assert (patched.json()["status"], patched.json()["description"]) == ("disabled", "off")
            assert (await client.delete(path, headers=auth)).json() == {"success": True}
            assert (await client.get(path, headers=auth)).status_code == 404


async def test_private_destinations_are_refused_unless_allowed(
    run_app: AppRunner, admin_key: Callable[[], str]
) -> None:
    async with run_app() as client:
        auth = key_headers(admin_key())
        for url in (
            "http://127.0.0.1:9/x",
            "http://localhost/x",
            "http://10.1.2.3/",
            "http://169.254.169.254/latest/meta-data",
            "http://[::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://192.168.0.1/",
        ):
            refused = await client.post("/v1/webhooks/endpoints", json={"url": url}, headers=auth)
            assert refused.status_code == 422, (url, refused.text)
            [problem] = refused.json()["detail"]
            assert problem["loc"] == ["body", "url"] and "KILN_WEBHOOK_ALLOW_PRIVATE" in problem["msg"]
    assert address_allowed("93.184.216.34") and not address_allowed("100.64.0.1")


async def test_bad_input_is_refused_by_name(run_app: AppRunner, admin_key: Callable[[], str], fast: Settings) -> None:
    async with run_app() as client:
        auth = key_headers(admin_key())
        url = "https://hooks.example.test/x"
        for body, loc in (
            ({"url": url, "secret": "mine"}, ["body", "secret"]),
            ({"url": "ftp://x/"}, ["body", "url"]),
            ({"url": "http://user:pw@example.test/"}, ["body", "url"]),
            ({"url": url, "event_patterns": ["nothing.matches"]}, ["body", "event_patterns", 0]),
            ({"url": url, "event_patterns": ["VM.*"]}, ["body", "event_patterns", 0]),
            ({"url": url, "event_patterns": []}, ["body", "event_patterns"]),
            ({"url": url, "max_retries": 11}, ["body", "max_retries"]),
            ({"url": url, "timeout_seconds": 0}, ["body", "timeout_seconds"]),
        ):
            answer = await client.post("/v1/webhooks/endpoints", json=body, headers=auth)
            assert answer.status_code == 422, (body, answer.text)
            assert answer.json()["detail"][0]["loc"] == loc, (body, answer.text)
        made = (await client.post("/v1/webhooks/endpoints", json={"url": "http://127.0.0.1:9/"}, headers=auth)).json()
        path = f"/v1/webhooks/endpoints/{made['id']}"
        assert (await client.patch(path, json={"colour": "red"}, headers=auth)).status_code == 422
        assert (await client.patch(path, json={}, headers=auth)).status_code == 422
        assert (await client.get("/v1/webhooks/endpoints/abc", headers=auth)).status_code == 422
        for params in ({"state": "x"}, {"status": "maybe"}, {"cursor": "x"}):
            assert (await client.get("/v1/webhooks/deliveries", params=params, headers=auth)).status_code == 422


async def test_another_users_endpoints_and_deliveries_are_404(
    run_app: AppRunner, admin_key: Callable[[], str], fast: Settings
) -> None:
    async with run_app() as client:
        admin = key_headers(admin_key())
        alice = key_headers(await add_user(fast, "alice"))
        made = (await client.post("/v1/webhooks/endpoints", json={"url": "http://127.0.0.1:9/"}, headers=admin)).json()
        queued = (await client.post(f"/v1/webhooks/endpoints/{made['id']}/test", headers=admin)).json()
        for method, path in (
            ("GET", f"/v1/webhooks/endpoints/{made['id']}"),
            ("PATCH", f"/v1/webhooks/endpoints/{made['id']}"),
            ("DELETE", f"/v1/webhooks/endpoints/{made['id']}"),
            ("POST", f"/v1/webhooks/endpoints/{made['id']}/rotate-secret"),
            ("POST", f"/v1/webhooks/endpoints/{made['id']}/test"),
            ("POST", f"/v1/webhooks/endpoints/{made['id']}/verify"),
            ("POST", f"/v1/webhooks/deliveries/{queued['delivery_id']}/replay"),
        ):
            body = {"description": "x"} if method == "PATCH" else None
            answer = await client.request(method, path, json=body, headers=alice)
            assert answer.status_code == 404, (method, path, answer.text)
        assert (await client.get("/v1/webhooks/endpoints", headers=alice)).json() == []
        assert (await client.get("/v1/webhooks/deliveries", headers=alice)).json() == {"items": [], "next_cursor": None}
