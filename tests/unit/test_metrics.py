"""GET /metrics (fake runtime): Prometheus's text format as its own parser reads
it, VM counts that match the API's, creates by path, refusals; only the
operator (the metrics token or the admin's key) may read it."""

from __future__ import annotations

from collections.abc import Callable

import httpx
from prometheus_client.parser import text_string_to_metric_families
from unit.fakes import FakeHypervisor
from unit.harness import AppRunner, add_user, bearer_headers, key_headers

from kiln.config import Settings
from kiln.runtime.errors import AgentTimeout, AgentUnavailable


async def scrape(
    client: httpx.AsyncClient, headers: dict[str, str]
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    answer = await client.get("/metrics", headers=headers)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
    }


async def test_the_metrics_parse_and_count_what_the_api_shows(
    run_app: AppRunner, admin_key: Callable[[], str], settings: Settings
) -> None:
    settings.quota_vms = 2
    async with run_app() as client:
        auth = key_headers(admin_key())
        first = (await client.post("/v1/vms", json={}, headers=auth)).json()["vm_id"]
        await client.post("/v1/vms", json={}, headers=auth)
        assert (await client.post("/v1/vms", json={}, headers=auth)).status_code == 429
        await client.delete(f"/v1/vms/{first}", headers=auth)

        samples = await scrape(client, auth)
        statuses = [vm["status"] for vm in (await client.get("/v1/vms/", headers=auth)).json()]
        for status in ("running", "terminated", "failed", "suspended"):
            assert samples[("kiln_vms", (("status", status),))] == statuses.count(status), status
        # No base snapshot with the fake images: both creates booted cold.
        assert samples[("kiln_vm_creates_total", (("outcome", "ok"), ("path", "cold")))] == 2
        assert samples[("kiln_vm_create_seconds_count", (("path", "cold"),))] == 2
        assert samples[("kiln_admission_refusals_total", (("kind", "quota"),))] == 1
        assert samples[("kiln_vm_memory_bytes", ())] == settings.default_memory_mb * 2**20
        assert samples[("kiln_vm_vcpus", ())] == settings.default_vcpu_count
        assert samples[("kiln_pool_target_vms", ())] == 0
        assert samples[("kiln_webhook_deliveries", (("status", "pending"),))] == 0
        # The fake machines' pids are no QEMU processes: only that the series are there.
        assert {"kiln_qemu_cpu_seconds", "kiln_qemu_resident_bytes", "kiln_qemu_processes"} <= {
            name for name, _ in samples
        }
        assert samples[("kiln_agent_errors_total", (("kind", "unreachable"),))] == 0


async def test_agent_failures_are_counted_by_kind_and_refusals_are_not(
    run_app: AppRunner, admin_key: Callable[[], str], hypervisor: FakeHypervisor
) -> None:
    hypervisor.agent_failures = {"stat": AgentUnavailable("the channel closed"), "read_file": AgentTimeout("late")}
    async with run_app() as client:
        auth = key_headers(admin_key())
        session_id = (await client.post("/v1/vms", json={}, headers=auth)).json()["session_id"]
        download = {"session_id": session_id, "filename": "/etc/hostname"}
        assert (await client.post("/download", data=download, headers=auth)).status_code == 503
        samples = await scrape(client, auth)
        assert samples[("kiln_agent_errors_total", (("kind", "unreachable"),))] == 1
        assert samples[("kiln_agent_errors_total", (("kind", "timeout"),))] == 0


async def test_only_the_operator_reads_the_metrics(
    run_app: AppRunner, admin_key: Callable[[], str], settings: Settings
) -> None:
    settings.metrics_token = "scrape-token-for-tests"
    async with run_app() as client:
        alice = await add_user(settings, "alice")
        assert (await client.get("/metrics")).status_code == 401
        refused = await client.get("/metrics", headers=key_headers(alice))
        assert refused.status_code == 403 and "operator" in refused.json()["detail"]
        assert (await client.get("/metrics", headers=bearer_headers("not-the-token"))).status_code == 401
        await scrape(client, bearer_headers("scrape-token-for-tests"))
        await scrape(client, key_headers(admin_key()))
