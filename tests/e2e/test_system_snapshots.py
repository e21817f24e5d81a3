"""System snapshots against a real ``kiln serve`` with real VMs: the operator
publishes (``kiln images publish``, the admin's API, a build through
``instavm snapshot build --type system``), another user lists them through the
SDK, creates VMs from them, and cannot delete or publish any; the SDK's
``templates.publish`` finds the published build and stops at devbox templates.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from contract_server import SERVER_ENV, SMALL, server
from devbox_manifest import template_snapshot_name, write_manifest
from instavm import InstaVM
from instavm.exceptions import ForbiddenError
from live_server import KILN, LiveServer, server_settings, start_server
from sdk_contract import REFUSAL_WORDS, error_text
from unit.harness import add_user

from kiln.services.snapshots.system import OPERATOR_ONLY
from kiln.store.db import Database
from kiln.store.repositories import SnapshotRepository

pytestmark = pytest.mark.vm
INSTAVM = Path(sys.executable).with_name("instavm")
BUILD_SECONDS = 900  # a builder VM's restore, its step and its save, under TCG
__all__ = ["server"]  # the module's live server (a fixture)


def kiln(server: LiveServer, *argv: str) -> dict:
    """``kiln <argv>`` as the operator runs it next to the server, its JSON answer."""
    env = {**os.environ, "KILN_URL": server.url, "KILN_API_KEY": server.admin_key}
    done = subprocess.run([str(KILN), *argv], env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, f"kiln {' '.join(argv)}: {done.returncode}\n{done.stdout}\n{done.stderr}"
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def admin(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers={"X-API-Key": server.admin_key}, timeout=600) as client:
        yield client


@pytest.fixture(scope="module")
def b_key(server: LiveServer) -> str:
    return asyncio.run(add_user(server_settings(server.data_dir), "user-b"))


@pytest.fixture(scope="module")
def user_b(server: LiveServer, b_key: str) -> InstaVM:
    return InstaVM(api_key=b_key, base_url=server.url, timeout=600, auto_start_session=False)


@pytest.fixture(scope="module")
def b_http(server: LiveServer, b_key: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers={"X-API-Key": b_key}, timeout=600) as client:
        yield client


def until_done(http: httpx.Client, snapshot_id: str) -> dict:
    """The snapshot's record once it is no longer ``creating``, polled as the SDK polls."""
    deadline = time.monotonic() + BUILD_SECONDS
    while (record := http.get(f"/v1/snapshots/{snapshot_id}").json())["status"] == "creating":
        assert time.monotonic() < deadline, f"snapshot {snapshot_id} still creating: {record}"
        time.sleep(1)
    return dict(record)


def rows_of_type(server: LiveServer, snapshot_type: str) -> dict[str, str]:
    """The server's snapshot rows of a type and their build logs, from its store
    (staging rows are never listed)."""

    async def read() -> dict[str, str]:
        db = Database(server_settings(server.data_dir).database)
        try:
            async with db.transaction() as session:
                rows = await SnapshotRepository(session).list_any_owner([snapshot_type])
                return {s.id: s.build_log or "" for s in rows}
        finally:
            await db.close()

    return asyncio.run(read())


def run(http: httpx.Client, session_id: str, command: str) -> str:
    answer = http.post("/execute", json={"session_id": session_id, "command": command, "language": "bash"})
    assert answer.status_code == 200, answer.text
    return str(answer.json()["stdout"])


def test_a_published_variant_is_every_users_and_read_only_to_them(
    server: LiveServer, admin: httpx.Client, user_b: InstaVM, b_http: httpx.Client
) -> None:
    published = kiln(
        server, "images", "publish", "default", "--name", "default-small",
        "--memory", str(SMALL["memory_mb"]), "--vcpus", str(SMALL["vcpu_count"]),
    )  # fmt: skip
    system_id = published["id"]
    assert (published["type"], published["status"], published["is_public"]) == ("system", "ready", True)

    listed = user_b.snapshots.list(snapshot_type="system")
    assert [(s["id"], s["name"], s["is_public"]) for s in listed] == [(system_id, "default-small", True)]
    assert user_b.snapshots.get(system_id)["status"] == "ready"
    vm = user_b.vms.create(wait=True, snapshot_id=system_id)
    try:
        assert vm["status"] == "running"
        assert "from-system" in run(b_http, vm["session_id"], "echo from-system")
        assert user_b.vms.get(vm["vm_id"])["snapshot_id"] == system_id

        with pytest.raises(ForbiddenError, match="system snapshot"):
            user_b.snapshots.delete(system_id)
        refused = b_http.post("/v1/system-snapshots", json={"image_variant": "default"})
        assert refused.status_code == 403 and "operator" in refused.json()["detail"]
        assert b_http.delete(f"/v1/system-snapshots/{system_id}").status_code == 403
        # Not even the operator deletes it as a user's snapshot; and not while a VM builds on it.
        assert admin.delete(f"/v1/snapshots/{system_id}").status_code == 403
        busy = admin.delete(f"/v1/system-snapshots/{system_id}")
        assert busy.status_code == 409 and vm["vm_id"] in busy.json()["detail"]
    finally:
        user_b.vms.delete(vm["vm_id"])
    assert kiln(server, "images", "unpublish", system_id) == {"success": True}
    assert user_b.snapshots.list(snapshot_type="system") == []


def test_an_admins_snapshot_published_outlives_its_source(
    server: LiveServer, admin: httpx.Client, user_b: InstaVM, b_http: httpx.Client
) -> None:
    created = admin.post("/v1/vms", json=SMALL)
    assert created.status_code == 200, created.text
    source_vm = created.json()
    run(admin, source_vm["session_id"], "echo made-by-the-operator > /root/marker && sync")
    saved = admin.post(f"/v1/vms/{source_vm['vm_id']}/snapshot", json={"name": "operator-private"}).json()
    assert saved["status"] == "ready", saved
    # The admin's own snapshot stays private: user B cannot tell it exists.
    assert b_http.get(f"/v1/snapshots/{saved['id']}").status_code == 404

    published = admin.post("/v1/system-snapshots", json={"snapshot_id": saved["id"], "name": "with-marker"})
    assert published.status_code == 200, published.text
    system = published.json()
    assert (system["type"], system["status"], system["parent_id"]) == ("system", "ready", None)
    # The copy stands alone: its source and the VM under it may go.
    assert admin.delete(f"/v1/vms/{source_vm['vm_id']}").status_code == 200
    assert admin.delete(f"/v1/snapshots/{saved['id']}").status_code == 200

    assert system["id"] in [s["id"] for s in user_b.snapshots.list()]
    vm = user_b.vms.create(wait=True, snapshot_id=system["id"])
    try:
        # Read from the copied disk, not from the page cache the restored memory holds.
        read = "echo 3 > /proc/sys/vm/drop_caches && cat /root/marker"
        assert run(b_http, vm["session_id"], read) == "made-by-the-operator\n"
    finally:
        user_b.vms.delete(vm["vm_id"])
    assert admin.delete(f"/v1/system-snapshots/{system['id']}").json() == {"success": True}


def test_publishing_refuses_what_it_cannot_use(admin: httpx.Client) -> None:
    cases = [
        ({}, ["body", "snapshot_id"]),
        ({"image_variant": "default", "snapshot_id": "snap-x"}, ["body", "snapshot_id"]),
        ({"image_variant": "no-such-variant"}, ["body", "image_variant"]),
        ({"image_variant": "default", "colour": "blue"}, ["body", "colour"]),
    ]
    for body, loc in cases:
        answer = admin.post("/v1/system-snapshots", json=body)
        assert answer.status_code == 422, (body, answer.text)
        assert loc in [problem["loc"] for problem in answer.json()["detail"]], answer.text
    assert admin.post("/v1/system-snapshots", json={"snapshot_id": "snap-nothing"}).status_code == 404


def test_the_operators_build_is_published_for_every_user(
    server: LiveServer, admin: httpx.Client, user_b: InstaVM, b_http: httpx.Client, tmp_path: Path
) -> None:
    name = template_snapshot_name("sysbuild")
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "INSTAVM_BASE_URL": server.url,
           "INSTAVM_API_KEY": server.admin_key}  # fmt: skip
    built = subprocess.run(
        [str(INSTAVM), "snapshot", "build", "default", "--type", "system", "--name", name,
         "--vcpu", str(SMALL["vcpu_count"]), "--memory", str(SMALL["memory_mb"]),
         "--run", "echo built-for-everyone > /root/built", "--json"],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert built.returncode == 0, built.stdout + built.stderr
    made = json.loads(built.stdout)
    assert (made["status"], made["type"], made["is_public"]) == ("creating", "system", True), made
    # A build that fails, at the same time: it fails the system snapshot, not a user's.
    broken_body = {"oci_image": "default", "type": "system", "name": "sysbuild-broken", **SMALL,
                   "build_args": {"post_build_cmd": "echo no-such-luck >&2; exit 3"}}  # fmt: skip
    broken = admin.post("/v1/snapshots", json=broken_body)
    assert broken.status_code == 200 and broken.json()["status"] == "creating", broken.text

    ready = until_done(admin, made["id"])
    assert (ready["status"], ready["type"], ready["parent_id"], ready["name"]) == ("ready", "system", None, name), ready
    assert "== post_build_cmd" in ready["build_log"], ready["build_log"]  # the build's log comes along
    again = admin.post("/v1/snapshots", json={**broken_body, "name": name})  # refused before anything starts
    assert again.status_code == 409 and ready["id"] in again.json()["detail"], again.text
    failed = until_done(admin, broken.json()["id"])
    assert failed["status"] == "failed" and "exited with 3" in failed["failure_reason"], failed
    # Nothing staged is left, and the admin has no snapshot of their own from either build.
    assert rows_of_type(server, "staging") == {}
    assert [s["id"] for s in admin.get("/v1/snapshots", params={"type": "user"}).json()] == []

    assert name in [s["name"] for s in user_b.snapshots.list(snapshot_type="system")]
    vm = user_b.vms.create(wait=True, snapshot_id=ready["id"])
    try:
        assert run(b_http, vm["session_id"], "cat /root/built") == "built-for-everyone\n"
    finally:
        user_b.vms.delete(vm["vm_id"])
    with pytest.raises(ForbiddenError, match="system snapshot"):
        user_b.snapshots.delete(ready["id"])
    with pytest.raises(ForbiddenError) as refused:
        user_b.snapshots.create(oci_image="default", name="by-b", snapshot_type="system")
    assert OPERATOR_ONLY in error_text(refused.value)

    # The SDK's publish finds the published build by name and goes on to devbox templates.
    operator = InstaVM(api_key=server.admin_key, base_url=server.url, timeout=600, auto_start_session=False)
    with pytest.raises(Exception) as stopped:
        operator.templates.publish(str(write_manifest(tmp_path / "template", "sysbuild")))
    text = error_text(stopped.value)
    assert "devbox templates" in text and REFUSAL_WORDS in text, text

    for snapshot_id in (ready["id"], failed["id"]):
        assert admin.delete(f"/v1/system-snapshots/{snapshot_id}").json() == {"success": True}


def test_a_publish_not_waited_for_answers_creating(server: LiveServer, admin: httpx.Client, user_b: InstaVM) -> None:
    body = {"image_variant": "default", "name": "not-waited", **SMALL}
    answer = admin.post("/v1/system-snapshots", params={"wait": "false"}, json=body)
    assert answer.status_code == 200 and answer.json()["status"] == "creating", answer.text
    ready = until_done(admin, answer.json()["id"])
    assert (ready["status"], ready["type"]) == ("ready", "system"), ready
    assert ready["id"] in [s["id"] for s in user_b.snapshots.list(snapshot_type="system")]
    assert admin.delete(f"/v1/system-snapshots/{ready['id']}").json() == {"success": True}


def test_a_system_build_a_crash_cut_short_is_failed_and_unstaged_at_the_next_start(
    server: LiveServer, admin: httpx.Client
) -> None:
    body = {"oci_image": "default", "type": "system", "name": "sysbuild-crashed", **SMALL,
            "build_args": {"post_build_cmd": "sleep 3600"}}  # fmt: skip
    made = admin.post("/v1/snapshots", json=body)
    assert made.status_code == 200, made.text
    system_id = made.json()["id"]
    deadline = time.monotonic() + BUILD_SECONDS
    while not any("== post_build_cmd" in log for log in rows_of_type(server, "staging").values()):
        assert time.monotonic() < deadline, rows_of_type(server, "staging")
        time.sleep(1)
    builders = [vm["vm_id"] for vm in admin.get("/v1/vms").json() if "kiln_build" in (vm.get("metadata") or {})]
    assert len(builders) == 1

    server.stop(crash=True)
    # The same port and data dir: the module's clients and teardown go on with the new process.
    port = int(server.url.rsplit(":", 1)[1])
    server.process = start_server(server.data_dir, port=port, env=SERVER_ENV).process
    failed = admin.get(f"/v1/snapshots/{system_id}").json()
    assert failed["status"] == "failed" and "the server stopped" in failed["failure_reason"], failed
    assert rows_of_type(server, "staging") == {}
    assert admin.get(f"/v1/vms/{builders[0]}").json()["status"] == "terminated"
    assert admin.delete(f"/v1/system-snapshots/{system_id}").json() == {"success": True}
