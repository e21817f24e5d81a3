"""VM routes over HTTP: wire shapes, 422s, tenancy and surviving a restart."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import pytest
from unit.fakes import FakeHypervisor, boot_error
from unit.harness import AppRunner, add_user, key_headers

from kiln.config import Settings

RECORD_FIELDS = {
    "vm_id", "session_id", "status", "vcpu_count", "memory_mb", "image_variant", "metadata",
    "created_at", "expires_at", "share", "custom_domain", "volumes", "vault_ids", "env_status",
    "env_error", "snapshot_on_terminate", "snapshot_name", "failure_reason", "auto_suspend",
    "auto_resume", "snapshot_id", "terminate_snapshot_id", "ssh_host", "ssh_port", "network_error",
}  # fmt: skip


async def test_create_get_list_delete(run_app: AppRunner, admin_key: Callable[[], str]) -> None:
    async with run_app() as client:
        auth = key_headers(admin_key())
        created = await client.post(
            "/v1/vms", json={"env": {"A": "1"}, "metadata": {"team": "x"}}, headers=auth
        )
        assert created.status_code == 200, created.text
        body = created.json()
        assert set(body) == {
            "vm_id", "session_id", "status", "share", "custom_domain", "env_status", "env_error"
        }  # fmt: skip
        assert (body["status"], body["env_status"]) == ("running", "applied")
        vm_id = body["vm_id"]

        record = (await client.get(f"/v1/vms/{vm_id}", headers=auth)).json()
        assert set(record) == RECORD_FIELDS
        assert record["metadata"] == {"team": "x"}

        live = (await client.get("/v1/vms", headers=auth)).json()
        assert [vm["vm_id"] for vm in live] == [vm_id]
        filtered = await client.get(
            "/v1/vms", params={"metadata": json.dumps({"team": "y"})}, headers=auth
        )
        assert filtered.json() == []

        deleted = await client.delete(f"/v1/vms/{vm_id}", headers=auth)
        assert deleted.json() == {"vm_id": vm_id, "status": "terminated", "snapshot_id": None}
        again = await client.delete(f"/v1/vms/{vm_id}", headers=auth)
        assert again.json() == deleted.json()

        assert (await client.get("/v1/vms", headers=auth)).json() == []
        everything = (await client.get("/v1/vms/", headers=auth)).json()
        assert [(vm["vm_id"], vm["status"]) for vm in everything] == [(vm_id, "terminated")]


async def test_no_wait(
    run_app: AppRunner, admin_key: Callable[[], str], hypervisor: FakeHypervisor
) -> None:
    hypervisor.ready_gate = asyncio.Event()
    async with run_app() as client:
        auth = key_headers(admin_key())
        created = await client.post(
            "/v1/vms", params={"wait": "false"}, json={"env": {"A": "1"}}, headers=auth
        )
        assert (created.json()["status"], created.json()["env_status"]) == ("creating", "pending")
        hypervisor.ready_gate.set()


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"memory_mb": 1}, ["body", "memory_mb"]),
        ({"memory_mb": "lots"}, ["body", "memory_mb"]),
        ({"env": {"BAD NAME": "x"}}, ["body", "env", "BAD NAME"]),
        ({"share": {"port": 70000}}, ["body", "share", "port"]),
        ({"vault_ids": ["v1"]}, ["body", "vault_ids", 0]),  # no such vault
        ({"volumes": [{"volume_id": "v", "mount_path": "/proc/x"}]}, ["body", "volumes", 0, "mount_path"]),
        ({"image_variant": "unknown"}, ["body", "image_variant"]),
    ],
)  # fmt: skip
async def test_validation_errors_have_the_seed_shape(
    run_app: AppRunner, admin_key: Callable[[], str], body: dict, loc: list
) -> None:
    async with run_app() as client:
        response = await client.post("/v1/vms", json=body, headers=key_headers(admin_key()))
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert all(set(problem) == {"loc", "msg", "type"} for problem in detail)
    assert loc in [problem["loc"] for problem in detail]
    # Nothing of the request is echoed back (env values may be secrets).
    assert "input" not in response.text


async def test_the_image_of_an_unbuilt_feature_is_refused_naming_it(
    run_app: AppRunner, admin_key: Callable[[], str]
) -> None:
    """`instavm desktop start` asks for the computer-use image: the answer names computer use."""
    async with run_app() as client:
        body = {"image_variant": "computer-use"}
        response = await client.post("/v1/vms", json=body, headers=key_headers(admin_key()))
    assert response.status_code == 422
    (problem,) = response.json()["detail"]
    assert problem["loc"] == ["body", "image_variant"] and "computer use" in problem["msg"], problem
    assert "not available on this server" in problem["msg"]


async def test_a_field_kiln_does_not_act_on_is_refused_by_name(
    run_app: AppRunner, admin_key: Callable[[], str]
) -> None:
    """Nothing of a create body is silently dropped: an unknown field, also inside
    share, custom_domain or a volume mount, is a 422 naming it, and no VM starts."""
    body = {
        "memory_mb": 256, "gpu_count": 1, "share": {"port": 8000, "tls": True},
        "custom_domain": {"domain": "a.example.com", "ttl": 60},
        "volumes": [{"volume_id": "vol-1", "mount_path": "/w", "readonly": True}],
    }  # fmt: skip
    async with run_app() as client:
        auth = key_headers(admin_key())
        response = await client.post("/v1/vms", json=body, headers=auth)
        assert response.status_code == 422
        detail = response.json()["detail"]
        assert sorted(problem["loc"] for problem in detail) == [
            ["body", "custom_domain", "ttl"], ["body", "gpu_count"], ["body", "share", "tls"],
            ["body", "volumes", 0, "readonly"],
        ]  # fmt: skip
        gpu = next(problem for problem in detail if problem["loc"] == ["body", "gpu_count"])
        assert "'gpu_count'" in gpu["msg"] and "refused" in gpu["msg"]
        assert (await client.get("/v1/vms", headers=auth)).json() == []
        # What the SDK sends beside the seed's fields is known, not refused.
        sdk = {"memory_mb": 256, "auto_resume": True}
        assert (await client.post("/v1/vms", json=sdk, headers=auth)).status_code == 200


async def test_bad_metadata_filter_is_422(run_app: AppRunner, admin_key: Callable[[], str]) -> None:
    async with run_app() as client:
        for value in ("{not json", "[1, 2]", '"text"'):
            response = await client.get(
                "/v1/vms/", params={"metadata": value}, headers=key_headers(admin_key())
            )
            assert response.status_code == 422
            assert response.json()["detail"][0]["loc"] == ["query", "metadata"]


async def test_failed_boot_is_503_and_recorded(
    run_app: AppRunner, admin_key: Callable[[], str], hypervisor: FakeHypervisor
) -> None:
    hypervisor.start_error = boot_error("no kernel")
    async with run_app() as client:
        auth = key_headers(admin_key())
        response = await client.post("/v1/vms", json={}, headers=auth)
        assert response.status_code == 503
        assert "no kernel" in response.json()["detail"]
        (vm,) = (await client.get("/v1/vms/", headers=auth)).json()
        assert vm["status"] == "failed" and "no kernel" in vm["failure_reason"]


async def test_full_host_is_503(
    run_app: AppRunner, admin_key: Callable[[], str], settings: Settings
) -> None:
    settings.max_vms = 1
    async with run_app() as client:
        auth = key_headers(admin_key())
        assert (await client.post("/v1/vms", json={}, headers=auth)).status_code == 200
        response = await client.post("/v1/vms", json={}, headers=auth)
    assert response.status_code == 503
    assert "limit" in response.json()["detail"]


async def test_users_cannot_see_each_others_vms(
    run_app: AppRunner, admin_key: Callable[[], str], settings: Settings
) -> None:
    async with run_app() as client:
        owner = key_headers(admin_key())
        stranger = key_headers(await add_user(settings, "mallory"))
        vm_id = (await client.post("/v1/vms", json={}, headers=owner)).json()["vm_id"]

        for method, path, body in (
            ("GET", f"/v1/vms/{vm_id}", None),
            ("PATCH", f"/v1/vms/{vm_id}", {"metadata": {"x": 1}}),
            ("DELETE", f"/v1/vms/{vm_id}", None),
            ("GET", f"/v1/vms/{vm_id}/console", None),
        ):
            response = await client.request(method, path, json=body, headers=stranger)
            assert response.status_code == 404, (method, path)
        assert (await client.get("/v1/vms", headers=stranger)).json() == []
        assert (await client.get("/v1/vms/", headers=stranger)).json() == []
        assert (await client.get(f"/v1/vms/{vm_id}", headers=owner)).json()["status"] == "running"


async def test_vms_survive_a_restart(
    run_app: AppRunner, admin_key: Callable[[], str], hypervisor: FakeHypervisor
) -> None:
    async with run_app() as client:
        auth = key_headers(admin_key())
        kept = (await client.post("/v1/vms", json={"metadata": {"k": 1}}, headers=auth)).json()
        lost = (await client.post("/v1/vms", json={}, headers=auth)).json()
    # The server is down; one VM process dies meanwhile.
    hypervisor.machines[lost["vm_id"]].alive = False

    async with run_app() as client:
        auth = key_headers(admin_key())
        record = (await client.get(f"/v1/vms/{kept['vm_id']}", headers=auth)).json()
        assert (record["status"], record["metadata"]) == ("running", {"k": 1})
        gone = (await client.get(f"/v1/vms/{lost['vm_id']}", headers=auth)).json()
        assert gone["status"] == "failed"
        assert gone["failure_reason"] == "not running after server restart"
