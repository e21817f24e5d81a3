"""The event stream through a real ``kiln serve`` with real VMs, read with the
instavm SDK's own ``client.audit``: a VM's whole life in order across cursor
pages, a snapshot's, a failed login; another user's events are invisible."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from instavm import InstaVM
from live_api import SMALL, Api, live_server
from live_server import cli, ensure_default_image
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def api() -> Iterator[Api]:
    with live_server("kiln-ev-") as live:
        # A cache hit (seconds): the shared cache's image may come from another checkout's agent.
        ensure_default_image(live.settings)
        yield live


def sdk(api: Api, key: str | None = None) -> InstaVM:
    return InstaVM(api_key=key or api.server.admin_key, base_url=api.server.url, auto_start_session=False)


def every_event(client: InstaVM, page_size: int, **filters: object) -> list[dict]:
    """All pages the SDK's ``audit.events`` gives, oldest first."""
    items: list[dict] = []
    cursor = None
    pages = 0
    while True:
        page = client.audit.events(cursor=cursor, limit=page_size, **filters)  # type: ignore[arg-type]
        assert len(page["items"]) <= page_size
        items.extend(page["items"])
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            assert pages > 1 or len(items) <= page_size
            return list(reversed(items))


def test_a_vms_whole_life_is_in_the_log_in_order(api: Api) -> None:
    vm = api.create_ok(**SMALL, vm_lifetime_seconds=600)
    vm_id, session_id = vm["vm_id"], vm["session_id"]
    assert api.run(session_id, "echo hi").strip() == "hi"
    snapshot = api.http.post(f"/v1/vms/{vm_id}/snapshot", json={"name": "ev-snap"})
    assert snapshot.status_code == 200 and snapshot.json()["status"] == "ready", snapshot.text
    snapshot_id = snapshot.json()["snapshot_id"]
    assert api.http.post(f"/v1/vms/{vm_id}/suspend").json()["status"] == "suspended"
    resumed = api.http.post(f"/v1/vms/{vm_id}/resume")
    assert resumed.status_code == 200 and resumed.json()["status"] == "running", resumed.text
    resumed_id = resumed.json()["vm_id"]
    assert api.delete(resumed_id).json()["status"] == "terminated"

    client = sdk(api)
    events = every_event(client, page_size=3, session_id=session_id)
    vm_types = [event["event_type"] for event in events if event["event_group"] == "vm"]
    assert vm_types == [
        "vm.created", "vm.running", "vm.suspending", "vm.suspended", "vm.resuming", "vm.running",
        "vm.terminating", "vm.terminated",
    ]  # fmt: skip
    ids = [int(event["id"]) for event in events]
    assert ids == sorted(ids)
    assert {event["vm_id"] for event in events} <= {vm_id, resumed_id}

    snapshot_events = [event for event in every_event(client, 50, vm_id=vm_id) if event["event_group"] == "snapshot"]
    assert [(e["event_type"], e["resource_id"]) for e in snapshot_events] == [
        ("snapshot.created", snapshot_id),
        ("snapshot.ready", snapshot_id),
    ]
    assert snapshot_events[1]["event_payload"]["size_bytes"] > 0

    one = client.audit.get_event(events[0]["id"])
    assert one["event_payload"]["memory_mb"] == SMALL["memory_mb"] and one["error_message"] is None
    assert "vm.terminated" in client.audit.catalog()["catalog"]["vm"]


def test_another_users_events_are_invisible(api: Api) -> None:
    cli(api.server, "users", "create", "evie", "--password-stdin", stdin="a long password\n")
    key = cli(api.server, "keys", "create", "--user", "evie").strip().splitlines()[-1]
    made = httpx.post(f"{api.server.url}/v1/api-keys/", json={"name": "second"}, headers={"X-API-Key": key})
    assert made.status_code == 200, made.text
    bad = httpx.post(f"{api.server.url}/v1/auth/token", data={"username": "evie", "password": "wrong"})
    assert bad.status_code == 401

    evie = sdk(api, key)
    mine = [event for event in every_event(evie, page_size=50) if event["event_group"] != "api"]
    assert [event["event_type"] for event in mine] == ["api_key.created", "api_key.created", "auth.login_failed"]
    assert {event["user_id"] for event in mine} == {mine[0]["user_id"]}

    admins = every_event(sdk(api), page_size=200)
    theirs = next(event for event in admins if event["user_id"] != mine[0]["user_id"])
    hidden = httpx.get(f"{api.server.url}/v1/audit/events/{theirs['id']}", headers={"X-API-Key": key})
    assert hidden.status_code == 404 and "not found" in hidden.json()["detail"]
    # The admin sees evie's events too.
    assert {event["id"] for event in mine} <= {event["id"] for event in admins}


def test_metrics_parse_and_match_the_api(api: Api) -> None:
    vm = api.create_ok(**SMALL, vm_lifetime_seconds=600)
    assert api.run(vm["session_id"], "echo metrics").strip() == "metrics"
    answer = api.http.get("/metrics")
    assert answer.status_code == 200, answer.text
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
    }
    every = api.http.get("/v1/vms/").json()
    for status in ("creating", "running", "suspended", "terminated", "failed"):
        assert samples[("kiln_vms", (("status", status),))] == sum(v["status"] == status for v in every), status
    # This module's creates restore the cached base snapshot (no pool here).
    assert samples[("kiln_vm_create_seconds_count", (("path", "restore"),))] >= 1
    assert samples[("kiln_exec_seconds_count", (("language", "bash"),))] >= 1
    # The VM's QEMU process is read from /proc: it has run, and holds memory.
    assert samples[("kiln_qemu_processes", ())] >= 1
    assert samples[("kiln_qemu_cpu_seconds", ())] > 0 and samples[("kiln_qemu_resident_bytes", ())] > 0
    assert samples[("kiln_agent_errors_total", (("kind", "unreachable"),))] == 0
    assert httpx.get(f"{api.server.url}/metrics").status_code == 401
    api.delete(vm["vm_id"])


def test_the_usage_ledger_counts_what_vms_ran(api: Api) -> None:
    vm = api.create_ok(**SMALL, vm_lifetime_seconds=600)
    assert api.run(vm["session_id"], "echo used").strip() == "used"
    client = sdk(api)
    client.session_id = vm["session_id"]  # the SDK's get_usage reads its own session

    running = client.get_usage()
    assert running["vcpu_seconds"] > 0 and running["memory_gib_seconds"] > 0 and running["disk_gib_seconds"] > 0
    api.delete(vm["vm_id"])
    ended = client.get_usage()
    breakdown = client.get_usage_breakdown(days=1)
    [mine] = [item for item in breakdown["vms"] if item["vm_id"] == vm["vm_id"]]
    # Closed at the termination: the ledger no longer grows, and the day holds it.
    assert client.get_usage()["vcpu_seconds"] == ended["vcpu_seconds"] >= running["vcpu_seconds"]
    assert mine["vcpu_seconds"] == ended["vcpu_seconds"]
    assert mine["memory_gib_seconds"] == ended["memory_gib_seconds"]
    assert mine["disk_gib_seconds"] == ended["disk_gib_seconds"] > 0
    assert breakdown["total_days"] == 1 and breakdown["totals"]["cpu_hours"] >= mine["cpu_hours"] > 0
