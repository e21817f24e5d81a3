"""Snapshots, clones, suspend/resume and restore-on-create through the HTTP API,
with the real QEMU runtime and database (the app runs in-process)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from live_server import destroy_leftovers, server_settings
from unit.harness import add_user, key_headers

from kiln.api.app import ADMIN_KEY_FILE, create_app
from kiln.config import Settings
from kiln.runtime.driver import SavedState
from kiln.runtime.qemu import QemuHypervisor
from kiln.services.snapshots.service import SnapshotService
from kiln.services.vms import VmService

pytestmark = pytest.mark.vm


@dataclass
class Api:
    client: httpx.AsyncClient
    vms: VmService
    auth: dict[str, str]
    other_auth: dict[str, str]
    snapshots: SnapshotService
    settings: Settings

    async def create(self, wait: bool = True, **fields: object) -> dict:
        response = await self.client.post(
            "/v1/vms", json=fields, params={"wait": wait}, headers=self.auth
        )
        assert response.status_code == 200, response.text
        return response.json()

    async def execute(self, vm_id: str, command: str, language: str) -> str:
        """Runs through POST /execute, as a user would, in the VM's own session."""
        vm = await self.client.get(f"/v1/vms/{vm_id}", headers=self.auth)
        response = await self.client.post(
            "/execute",
            json={"command": command, "language": language, "session_id": vm.json()["session_id"]},
            headers=self.auth,
        )
        assert response.status_code == 200, response.text
        return response.json()["stdout"]

    async def shell(self, vm_id: str, command: str) -> str:
        return await self.execute(vm_id, command, "bash")

    async def python(self, vm_id: str, code: str) -> str:
        return await self.execute(vm_id, code, "python")

    @property
    def owner_id(self) -> int:
        return 1  # the bootstrap admin


@asynccontextmanager
async def running_api(
    vm_settings: Settings,
    base_snapshot: SavedState,
    pool_size: int = 0,
    max_disk_chain: int = 8,
    **settings_overrides: Any,
) -> AsyncIterator[Api]:
    """A started app over a fresh data dir whose default VM shape is the base
    snapshot's, so creates restore (the cache is the shared KILN_CACHE_DIR).
    ``settings_overrides``: more Settings fields (e.g. the OCI import roots)."""
    data_dir = Path(vm_settings.data_dir) / f"api-{time.monotonic_ns() % 10**8}"
    settings = server_settings(data_dir).model_copy(update=dict(
        cache_dir=vm_settings.cache_dir,
        database_url=f"sqlite+aiosqlite:///{data_dir / 'kiln.db'}",
        default_memory_mb=base_snapshot.memory_mb,
        default_vcpu_count=base_snapshot.vcpu_count,
        pool_size=pool_size,
        max_disk_chain=max_disk_chain,
        **settings_overrides,
    ))
    hypervisor = QemuHypervisor(settings)
    app: FastAPI = create_app(settings, hypervisor=hypervisor)
    try:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://kiln", timeout=120
            ) as client:
                admin = (data_dir / ADMIN_KEY_FILE).read_text().strip()
                other = await add_user(settings, "other")
                services = app.state.services
                try:
                    yield Api(
                        client,
                        services.vms,
                        key_headers(admin),
                        key_headers(other),
                        services.snapshots,
                        settings,
                    )
                finally:
                    for vm in await services.vms.list(1, live_only=True):
                        await services.vms.terminate(1, vm.id)
    finally:
        # Users' VMs were deleted and the server stopped: no VM may be left running
        # (idle pool VMs do not outlive the server). Whatever is, goes anyway, with
        # the host daemons the app started, also when the test failed.
        leftovers = hypervisor.running_under(settings.vms_dir)
        left_links = await destroy_leftovers(settings)
    assert not leftovers, f"VMs still running after the server stopped: {leftovers}"
    assert not left_links, f"network namespaces or links left behind: {left_links}"


@pytest.fixture
async def api(vm_settings: Settings, base_snapshot: SavedState) -> AsyncIterator[Api]:
    async with running_api(vm_settings, base_snapshot) as started:
        yield started


async def test_a_create_restores_the_base_snapshot(api: Api) -> None:
    started = time.monotonic()
    vm = await api.create()
    print(f"\ncreate (restore from the base snapshot) to running: {time.monotonic() - started:.2f}s")
    assert vm["status"] == "running"
    assert (await api.shell(vm["vm_id"], "hostname")).strip() == vm["vm_id"]
    bases = (await api.client.get("/v1/snapshots?type=base", headers=api.other_auth)).json()
    assert [base["type"] for base in bases] == ["base"]
    # Visible to all, deletable by none.
    deleted = await api.client.delete(f"/v1/snapshots/{bases[0]['id']}", headers=api.auth)
    assert deleted.status_code == 409


async def test_a_vm_made_from_a_snapshot_continues_where_it_was(api: Api) -> None:
    source = (await api.create())["vm_id"]
    await api.shell(source, "echo saved > /root/file; (sleep 1000 &); true")
    await api.python(source, "answer = 42")
    response = await api.client.post(
        f"/v1/vms/{source}/snapshot", json={"name": "mine"}, headers=api.auth
    )
    assert response.status_code == 200, response.text
    snapshot = response.json()
    assert (snapshot["status"], snapshot["type"], snapshot["name"]) == ("ready", "user", "mine")
    assert snapshot["source_vm_id"] == source and snapshot["size_bytes"] > 0

    clone = await api.create(snapshot_id=snapshot["id"])
    vm_id = clone["vm_id"]
    assert await api.shell(vm_id, "cat /root/file") == "saved\n"
    assert await api.shell(vm_id, "pgrep -x sleep >/dev/null && echo alive") == "alive\n"
    assert await api.python(vm_id, "print(answer)") == "42\n"
    assert (await api.shell(vm_id, "hostname")).strip() == vm_id
    record = (await api.client.get(f"/v1/vms/{vm_id}", headers=api.auth)).json()
    assert record["snapshot_id"] == snapshot["id"]

    # In use by two VMs: not deletable; once they are gone, it is.
    in_use = await api.client.delete(f"/v1/snapshots/{snapshot['id']}", headers=api.auth)
    assert in_use.status_code == 409 and vm_id in in_use.json()["detail"]
    for vm in (source, vm_id):
        await api.client.delete(f"/v1/vms/{vm}", headers=api.auth)
    gone = await api.client.delete(f"/v1/snapshots/{snapshot['id']}", headers=api.auth)
    assert gone.status_code == 200, gone.text
    assert (await api.client.get(f"/v1/snapshots/{snapshot['id']}", headers=api.auth)).status_code == 404


async def test_snapshot_id_is_checked(api: Api) -> None:
    source = (await api.create())["vm_id"]
    snapshot = (
        await api.client.post(f"/v1/vms/{source}/snapshot", headers=api.auth)
    ).json()
    wrong_shape = await api.client.post(
        "/v1/vms", json={"snapshot_id": snapshot["id"], "memory_mb": 1024}, headers=api.auth
    )
    assert wrong_shape.status_code == 422
    (problem,) = wrong_shape.json()["detail"]
    assert problem["loc"] == ["body", "memory_mb"]
    assert "saved with" in problem["msg"]
    for auth in (api.auth, api.other_auth):
        missing = await api.client.post(
            "/v1/vms",
            json={"snapshot_id": "snap-nothing" if auth is api.auth else snapshot["id"]},
            headers=auth,
        )
        assert missing.status_code == 404
        assert "snapshot_id" in missing.json()["detail"]
    # Another user sees neither the snapshot nor its listing.
    assert (
        await api.client.get(f"/v1/snapshots/{snapshot['id']}", headers=api.other_auth)
    ).status_code == 404
    assert (await api.client.get("/v1/snapshots?type=user", headers=api.other_auth)).json() == []
    refused = await api.client.post(
        "/v1/snapshots", json={"oci_image": "/tmp/layout"}, headers=api.auth
    )
    # No such layout (imports themselves: test_oci_import.py).
    assert refused.status_code == 422 and refused.json()["detail"][0]["loc"][-1] == "oci_image"


async def test_snapshot_on_terminate_saves_the_vm_first(api: Api) -> None:
    vm_id = (await api.create(snapshot_on_terminate=True, snapshot_name="last words"))["vm_id"]
    await api.shell(vm_id, "echo bye > /root/file")
    deleted = (await api.client.delete(f"/v1/vms/{vm_id}", headers=api.auth)).json()
    assert deleted["status"] == "terminated" and deleted["snapshot_id"]
    snapshot = (
        await api.client.get(f"/v1/snapshots/{deleted['snapshot_id']}", headers=api.auth)
    ).json()
    assert (snapshot["type"], snapshot["name"], snapshot["status"]) == ("auto", "last words", "ready")
    record = (await api.client.get(f"/v1/vms/{vm_id}", headers=api.auth)).json()
    assert record["terminate_snapshot_id"] == snapshot["id"]
    revived = await api.create(snapshot_id=snapshot["id"])
    assert await api.shell(revived["vm_id"], "cat /root/file") == "bye\n"


async def test_suspend_and_resume_keep_the_vm(api: Api) -> None:
    vm_id = (await api.create())["vm_id"]
    await api.python(vm_id, "kept = 'yes'")
    suspended = await api.client.post(f"/v1/vms/{vm_id}/suspend", headers=api.auth)
    assert suspended.status_code == 200, suspended.text
    assert suspended.json()["status"] == "suspended"
    live = (await api.client.get("/v1/vms", headers=api.auth)).json()
    assert [vm["status"] for vm in live if vm["vm_id"] == vm_id] == ["suspended"]

    resumed = await api.client.post(f"/v1/vms/{vm_id}/resume", headers=api.auth)
    assert resumed.status_code == 200, resumed.text
    assert (resumed.json()["vm_id"], resumed.json()["status"]) == (vm_id, "running")
    assert await api.python(vm_id, "print(kept)") == "yes\n"

    # auto_resume: talking to a suspended VM wakes it.
    await api.client.patch(f"/v1/vms/{vm_id}", json={"auto_resume": True}, headers=api.auth)
    await api.client.post(f"/v1/vms/{vm_id}/suspend", headers=api.auth)
    assert await api.python(vm_id, "print(kept)") == "yes\n"


async def test_clone_makes_a_second_vm_with_the_same_memory_and_disk(api: Api) -> None:
    source = (await api.create())["vm_id"]
    await api.shell(source, "echo original > /root/file")
    response = await api.client.post(
        f"/v1/vms/{source}/clone", json={"snapshot_name": "fork"}, headers=api.auth
    )
    assert response.status_code == 200, response.text
    clone = response.json()
    assert clone["status"] == "running" and clone["vm_id"] != source
    assert await api.shell(clone["vm_id"], "cat /root/file") == "original\n"
    # They are two machines now.
    await api.shell(clone["vm_id"], "echo changed > /root/file")
    assert await api.shell(source, "cat /root/file") == "original\n"
    names = [s["name"] for s in (await api.client.get("/v1/snapshots", headers=api.auth)).json()]
    assert "fork" in names


async def test_the_warm_pool_hands_out_running_vms(
    vm_settings: Settings, base_snapshot: SavedState
) -> None:
    async with running_api(vm_settings, base_snapshot, pool_size=1) as api:
        pool = api.vms.pool
        assert pool is not None
        for _ in range(100):
            if pool.idle_count:
                break
            await asyncio.sleep(0.1)
        started = time.monotonic()
        first = await api.create()
        print(f"\ncreate from the warm pool to running: {time.monotonic() - started:.3f}s")
        second = await api.create()  # the pool may be empty still: then a restore
        outputs = [
            await api.shell(vm["vm_id"], "hostname; head -c 16 /dev/urandom | od -An -tx1")
            for vm in (first, second)
        ]
        for vm, output in zip((first, second), outputs, strict=True):
            assert output.split()[0] == vm["vm_id"]
        assert outputs[0].split()[1:] != outputs[1].split()[1:]


async def test_vms_claimed_from_the_pool_have_their_own_identity_and_the_right_time(
    vm_settings: Settings, base_snapshot: SavedState
) -> None:
    """Pool VMs get their identity when the pool fills; a claim must still hand
    out a VM with its own randomness, hostname = vm_id, and the host's time."""
    async with running_api(vm_settings, base_snapshot, pool_size=2) as api:
        pool = api.vms.pool
        assert pool is not None
        for _ in range(600):
            if pool.idle_count == 2:
                break
            await asyncio.sleep(0.1)
        idle = pool.idle_machines
        assert len(idle) == 2
        # Put their clocks an hour behind: the claim, not the fill, must set them.
        for machine in idle:
            await machine.agent.call("set_clock", time_ns=time.time_ns() - 3600 * 10**9)
        vms = [await api.create(), await api.create()]
        assert sorted(vm["vm_id"] for vm in vms) == sorted(m.vm_id for m in idle)
        seen = []
        for vm in vms:
            asked = time.time()
            output = await api.shell(
                vm["vm_id"],
                "hostname; cat /proc/sys/kernel/random/uuid; "
                "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n'; echo; date +%s.%N",
            )
            answered = time.time()
            hostname, kernel_uuid, random_hex, guest_time = output.split()
            assert hostname == vm["vm_id"]
            # The guest read its clock while the host waited: the host's time then
            # (a second of slack for the clock's own step), never an hour behind.
            assert asked - 1.0 <= float(guest_time) <= answered + 1.0, (asked, guest_time, answered)
            python_uuid = await api.python(vm["vm_id"], "import uuid; print(uuid.uuid4())")
            seen.append((kernel_uuid, random_hex, python_uuid.strip()))
        for values in zip(*seen, strict=True):
            assert values[0] != values[1]


async def test_a_long_disk_chain_is_flattened(vm_settings: Settings, base_snapshot) -> None:
    async with running_api(vm_settings, base_snapshot, max_disk_chain=2) as api:
        vm_id = (await api.create())["vm_id"]
        snapshots = []
        for layer in range(2):
            await api.shell(vm_id, f"echo {layer} > /root/layer{layer}")
            response = await api.client.post(f"/v1/vms/{vm_id}/snapshot", headers=api.auth)
            snapshots.append(response.json())
        # base <- first <- second: three layers, one too many for the second.
        assert snapshots[1]["parent_id"] == snapshots[0]["id"]
        for _ in range(100):
            record = await api.client.get(f"/v1/snapshots/{snapshots[1]['id']}", headers=api.auth)
            if record.json()["parent_id"] is None:
                break
            await asyncio.sleep(0.1)
        assert record.json()["parent_id"] is None
        revived = (await api.create(snapshot_id=snapshots[1]["id"]))["vm_id"]
        assert await api.shell(revived, "cat /root/layer0 /root/layer1") == "0\n1\n"


async def test_garbage_collection_removes_unneeded_saved_states(api: Api) -> None:
    vm_id = (await api.create())["vm_id"]
    await api.client.post(f"/v1/vms/{vm_id}/suspend", headers=api.auth)
    snapshots_dir = api.settings.snapshots_dir
    (suspend_state,) = list(snapshots_dir.iterdir())
    stray = snapshots_dir / "snap-nobody"
    stray.mkdir()
    await api.snapshots.housekeeping.collect_garbage()
    assert not stray.exists()
    assert suspend_state.exists()  # its VM is still suspended
    await api.client.delete(f"/v1/vms/{vm_id}", headers=api.auth)
    await api.snapshots.housekeeping.collect_garbage()
    assert not suspend_state.exists()
