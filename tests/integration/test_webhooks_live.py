"""Webhooks through a real ``kiln serve`` with real VMs and a real HTTP
receiver on loopback, driven with the instavm SDK's ``client.webhooks`` and
checked with its own ``webhooks.verify``: the events subscribed to arrive,
signed; a receiver that fails twice gets the event once with its retries
listed; a delivery in flight at a ``kill -9`` of the server is sent after
the restart."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
from instavm import InstaVM
from instavm.webhooks import verify
from live_api import SMALL, Api, live_server
from live_server import ensure_default_image, start_server
from webhook_receiver import HOLD, receiver

pytestmark = pytest.mark.vm

ENV = {
    # The receiver is on loopback.
    "KILN_WEBHOOK_ALLOW_PRIVATE": "true",
    "KILN_WEBHOOK_POLL_SECONDS": "0.2",
    "KILN_WEBHOOK_RETRY_BASE_SECONDS": "0.2",
    "KILN_WEBHOOK_RETRY_MAX_SECONDS": "1",
}


@pytest.fixture(scope="module")
def api() -> Iterator[Api]:
    with live_server("kiln-wh-", env=ENV) as live:
        ensure_default_image(live.settings)
        yield live


def sdk(api: Api) -> InstaVM:
    return InstaVM(api_key=api.server.admin_key, base_url=api.server.url, auto_start_session=False)


def deliveries_until(client: InstaVM, endpoint_id: str, settled: int) -> list[dict]:
    """The endpoint's deliveries once ``settled`` of them are no longer pending (or after a minute)."""
    deadline = time.monotonic() + 60
    while True:
        items = client.webhooks.list_deliveries(endpoint_id=endpoint_id)["items"]
        if sum(item["status"] != "pending" for item in items) >= settled or time.monotonic() > deadline:
            return items
        time.sleep(0.1)


def test_the_events_subscribed_to_arrive_signed(api: Api) -> None:
    client = sdk(api)
    with receiver() as hook:
        endpoint = client.webhooks.create_endpoint(hook.url, description="vm life", event_patterns=["vm.*"])
        secret = endpoint["secret"]
        vm = api.create_ok(**SMALL, vm_lifetime_seconds=600)
        assert api.delete(vm["vm_id"]).json()["status"] == "terminated"
        got = hook.wait_for(4)
        events = [verify(item.headers, item.body, secret) for item in got]
        assert [event["event_type"] for event in events] == [
            "vm.created",
            "vm.running",
            "vm.terminating",
            "vm.terminated",
        ]
        assert {event["vm_id"] for event in events} == {vm["vm_id"]}
        # What arrived is what the audit log holds.
        assert client.audit.get_event(events[-1]["id"])["event_type"] == "vm.terminated"
        settled = deliveries_until(client, endpoint["id"], 4)
        assert {item["status"] for item in settled} == {"succeeded"}
        client.webhooks.delete_endpoint(endpoint["id"])


def test_a_receiver_failing_twice_gets_the_event_once_with_its_retries_listed(api: Api) -> None:
    client = sdk(api)
    with receiver(script=[500, 502]) as hook:
        endpoint = client.webhooks.create_endpoint(hook.url, event_patterns=["snapshot.ready"], max_retries=3)
        vm = api.create_ok(**SMALL, vm_lifetime_seconds=600)
        snapshot = api.http.post(f"/v1/vms/{vm['vm_id']}/snapshot", json={"name": "wh"})
        assert snapshot.status_code == 200 and snapshot.json()["status"] == "ready", snapshot.text
        [delivery] = deliveries_until(client, endpoint["id"], 1)
        assert delivery["status"] == "succeeded", delivery
        assert [attempt["status_code"] for attempt in delivery["attempts"]] == [500, 502, 200]
        accepted = [item for item in hook.received if item.answered == 200]
        assert len(accepted) == 1
        event = verify(accepted[0].headers, accepted[0].body, endpoint["secret"])
        assert (event["event_type"], event["resource_id"]) == ("snapshot.ready", snapshot.json()["snapshot_id"])
        api.delete(vm["vm_id"])
        client.webhooks.delete_endpoint(endpoint["id"])


def test_a_delivery_in_flight_at_a_kill_is_sent_after_the_restart(api: Api) -> None:
    client = sdk(api)
    with receiver(script=[HOLD]) as hook:
        endpoint = client.webhooks.create_endpoint(hook.url, event_patterns=["vm.created"], timeout_seconds=30)
        queued = client.webhooks.send_test_event(endpoint["id"])
        assert hook.holding.wait(60), "the test event never reached the receiver"
        # The server dies with the request open: no attempt was recorded, the row is pending.
        api.server.stop(crash=True)
        hook.release.set()
        api.connect(start_server(api.server.data_dir, env=ENV))
        client = sdk(api)
        [delivery] = deliveries_until(client, endpoint["id"], 1)
        assert (delivery["id"], delivery["status"]) == (queued["delivery_id"], "succeeded")
        assert len(hook.received) == 2
        again = hook.received[1]
        assert again.headers["instavm-delivery-id"] == queued["delivery_id"]
        assert verify(again.headers, again.body, endpoint["secret"])["event_type"] == "webhook.test"
        assert json.loads(again.body) == json.loads(hook.received[0].body)
        client.webhooks.delete_endpoint(endpoint["id"])
