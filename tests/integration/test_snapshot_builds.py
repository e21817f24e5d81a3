"""Snapshot builds end to end: a real ``kiln serve`` (root, nftables, its egress
daemon), a real builder VM, package mirrors the test builds and serves from the
local outside world (``mirror.test``, never the internet), and the SDK's own
``snapshots.create`` and its polling of ``GET /v1/snapshots/{id}``.

The server's mirror settings point apt, pip and npm at ``mirror.test``; the
builder may reach that host alone. A VM made from the built snapshot has the
packages; one built with ``disk_size_gb`` has the grown disk and file system.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from egress_helpers import world_env
from instavm import InstaVM
from instavm.exceptions import InstaVMError
from live_api import SMALL, Api, live_server, wait_until
from live_server import start_server
from outside_world import OutsideWorld
from package_mirrors import (
    APT_FILE,
    APT_PACKAGE,
    GIT_FILE,
    GIT_REPOSITORY,
    NPM_PACKAGE,
    PIP_MODULE,
    PIP_PACKAGE,
    build_all,
)

from kiln.config import Settings
from kiln.runtime.images import ImageStore
from kiln.runtime.qemu import QemuHypervisor
from kiln.runtime.snapshots import BaseSnapshots, Shape

# A safety net for a wedged build (TCG VMs install slowly), not a performance check.
pytestmark = [pytest.mark.vm, pytest.mark.timeout(1500)]

SERVER_ENV: dict[str, str] = {}  # the module's server's, for its restart


@pytest.fixture(scope="module")
def api(world: OutsideWorld) -> Iterator[Api]:
    # The node variant (it has npm) and its base snapshot of the small shape, made
    # before the server starts (the default one is made by live_server).
    settings = Settings()
    store, base = ImageStore(settings), BaseSnapshots(settings, QemuHypervisor(settings))
    asyncio.run(base.ensure(store.build("node"), Shape(**SMALL)))
    mirrors = build_all(world.mirror_root, "http://mirror.test")
    SERVER_ENV.update(world_env(world, **mirrors))
    with live_server("kiln-build-", env=SERVER_ENV) as served:
        try:
            yield served
        finally:
            lines = served.server.log_tail(3000).splitlines()
            print("\n".join(line for line in lines if line.startswith(("WARNING", "ERROR"))))


@pytest.fixture
def sdk(api: Api) -> InstaVM:
    return InstaVM(api_key=api.server.admin_key, base_url=api.server.url, timeout=120, auto_start_session=False)


def run(sdk: InstaVM, vm_id: str, command: str) -> str:
    session = sdk.vms.get(vm_id)["session_id"]
    result = sdk._request_json(
        "POST", "/execute", json_data={"session_id": session, "command": command, "language": "bash"}
    )
    assert result["exit_code"] == 0, result
    return str(result["stdout"])


def builders_gone(sdk: InstaVM) -> bool:
    """True once no builder VM runs (it is terminated right after its build ends)."""
    return wait_until(lambda: [vm for vm in sdk.vms.list() if vm.get("status") == "running"] == [], timeout=120)


def mirror_paths(world: OutsideWorld) -> list[str]:
    with world.seen.lock:
        return [request.path for request in world.seen.requests if request.server == "mirror-http"]


def test_a_build_installs_apt_pip_and_npm_packages_from_the_mirrors(
    api: Api, sdk: InstaVM, world: OutsideWorld
) -> None:
    created = sdk.snapshots.create(
        oci_image="node",
        name="with probes",
        build_args={
            "extra_apt_packages": APT_PACKAGE,  # one string, as `instavm snapshot build --apt` sends it
            "extra_pip_packages": [PIP_PACKAGE],
            "extra_npm_packages": [NPM_PACKAGE],
            "envs": {"BUILT_BY": "kiln"},
            "post_build_cmd": "echo post-build > /app/post-build.txt",
        },
        **SMALL,
    )
    # Answered at once: the build goes on in the background.
    assert created["status"] == "creating", created
    # The SDK's own wait (templates.publish polls GET /v1/snapshots/{id} with it).
    ready = sdk.templates._wait_for_snapshot(created["id"])
    log = ready["build_log"]
    assert ready["status"] == "ready", ready
    for step in (f"apt-get install {APT_PACKAGE}", f"pip install {PIP_PACKAGE}", f"npm install -g {NPM_PACKAGE}"):
        assert step in log, log
    assert ready["type"] == "user" and ready["size_bytes"] > 0
    paths = mirror_paths(world)
    for manager in ("apt", "pip", "npm"):
        assert any(path.startswith(f"/{manager}/") for path in paths), paths
    # The builder goes right after the save.
    assert builders_gone(sdk)

    vm = sdk.vms.create(snapshot_id=created["id"], wait=True)
    try:
        assert run(sdk, vm["vm_id"], f"cat {APT_FILE}") == "installed by apt\n"
        assert run(sdk, vm["vm_id"], f"dpkg-query -W -f '${{Status}}' {APT_PACKAGE}") == "install ok installed"
        imported = f"import {PIP_MODULE}; print({PIP_MODULE}.INSTALLED_BY)"
        assert run(sdk, vm["vm_id"], f"python3 -c '{imported}'") == "pip\n"
        required = f"console.log(require('{NPM_PACKAGE}'))"
        # Where Debian's npm installs global packages (`npm root -g`, which is slow to ask under TCG).
        assert run(sdk, vm["vm_id"], f'NODE_PATH=/usr/local/lib/node_modules node -e "{required}"') == (
            "installed by npm\n"
        )
        assert run(sdk, vm["vm_id"], 'printf %s "$BUILT_BY"; cat /app/post-build.txt') == "kilnpost-build\n"
    finally:
        sdk.vms.delete(vm["vm_id"])
    sdk.snapshots.delete(created["id"])


def test_a_git_clone_and_a_template_app_that_runs_in_every_vm(sdk: InstaVM, world: OutsideWorld) -> None:
    created = sdk.snapshots.create(
        oci_image="default",
        build_args={
            "git_clone_url": f"http://mirror.test/{GIT_REPOSITORY}",
            "git_clone_branch": "main",
            "template_app_cmd": "python3 -m http.server 8123 --bind 127.0.0.1",
            "template_app_cwd": "/app/app",
            # The builder reaches the mirror host and nothing else of the world.
            "post_build_cmd": "! curl -sS --max-time 10 http://allowed.test/",
        },
    )
    ready = sdk.templates._wait_for_snapshot(created["id"])
    assert world.seen.to("allowed-http") == []
    assert "== git clone" in ready["build_log"] and "== template_app_cmd" in ready["build_log"], ready
    vm = sdk.vms.create(snapshot_id=created["id"], wait=True)
    try:
        assert run(sdk, vm["vm_id"], f"cat /app/app/{GIT_FILE}") == "cloned by the build\n"
        # Started in the builder just before the save: it runs on in the VM restored
        # from it (where it may still be starting up, hence the retries).
        fetch = f"curl -sS --retry 60 --retry-connrefused --retry-delay 1 http://127.0.0.1:8123/{GIT_FILE}"
        served = run(sdk, vm["vm_id"], f"{fetch} || cat /var/log/kiln-template-app.log")
        assert served == "cloned by the build\n"
    finally:
        sdk.vms.delete(vm["vm_id"])
    sdk.snapshots.delete(created["id"])


def test_a_failing_step_fails_the_build_with_its_reason(sdk: InstaVM) -> None:
    created = sdk.snapshots.create(oci_image="default", build_args={"extra_apt_packages": ["no-such-package"]})
    with pytest.raises(InstaVMError, match="apt-get install no-such-package"):
        sdk.templates._wait_for_snapshot(created["id"])
    failed = sdk.snapshots.get(created["id"])
    assert failed["status"] == "failed" and "exited with 100" in failed["failure_reason"], failed
    assert "Unable to locate package no-such-package" in failed["build_log"]
    assert builders_gone(sdk)
    sdk.snapshots.delete(created["id"])


def test_unusable_build_args_are_a_422_naming_them(api: Api) -> None:
    response = api.http.post(
        "/v1/snapshots",
        json={"oci_image": "default", "build_args": {"disk_size_gb": 0, "extra_npm_packages": [NPM_PACKAGE],
                                                     "extra_apt_packages": ["-o", "x"], "nope": 1}},
    )  # fmt: skip
    assert response.status_code == 422, response.text
    named = {entry["loc"][-1] for entry in response.json()["detail"]}
    assert named == {"disk_size_gb", "extra_npm_packages", "extra_apt_packages", "nope"}, response.json()
    assert [s for s in api.http.get("/v1/snapshots?type=user").json()] == []


def test_disk_size_gb_grows_the_disk_of_the_build_and_of_every_vm_made_from_it(api: Api, sdk: InstaVM) -> None:
    # The default image's disk is about 1.1 GiB with under 1 GiB free: 1.5 GiB
    # (allocated, not written: fast under TCG) only fits on the grown disk.
    created = sdk.snapshots.create(
        oci_image="default",
        build_args={"disk_size_gb": 3, "post_build_cmd": "fallocate -l 1536M /var/tmp/room && rm /var/tmp/room"},
    )
    ready = sdk.templates._wait_for_snapshot(created["id"])
    assert "== grow the root file system to 3 GiB" in ready["build_log"], ready
    vm = sdk.vms.create(snapshot_id=created["id"], wait=True)
    try:
        device = int(run(sdk, vm["vm_id"], "cat /sys/block/vda/size")) * 512
        filesystem = int(run(sdk, vm["vm_id"], "df -B1 --output=size / | tail -1"))
        assert device == 3 << 30
        # ext4's own metadata aside, the file system fills the disk.
        assert filesystem > (3 << 30) * 0.9, filesystem
        run(sdk, vm["vm_id"], "fallocate -l 1536M /var/tmp/room && rm /var/tmp/room")
        # A suspend saves the grown disk; the resumed VM goes on with it.
        assert sdk.vms.suspend(vm["vm_id"])["status"] == "suspended"
        assert sdk.vms.resume(vm["vm_id"], wait=True)["status"] == "running"
        assert int(run(sdk, vm["vm_id"], "df -B1 --output=size / | tail -1")) == filesystem
        # The usage ledger counts the disk it may grow to: the grown one (running,
        # then suspended with its memory, then running again).
        with sqlite3.connect(api.server.data_dir / "kiln.db") as db:
            counted = db.execute(
                "SELECT disk_mb FROM usage_intervals WHERE vm_id = ? ORDER BY id", (vm["vm_id"],)
            ).fetchall()
        memory = sdk.vms.get(vm["vm_id"])["memory_mb"]
        assert counted == [(3 << 10,), ((3 << 10) + memory,), (3 << 10,)], counted
    finally:
        sdk.vms.delete(vm["vm_id"])
    sdk.snapshots.delete(created["id"])


def test_instavm_snapshot_build(api: Api, sdk: InstaVM, tmp_path: Path) -> None:
    env = {**os.environ, "HOME": str(tmp_path), "INSTAVM_API_KEY": api.server.admin_key,
           "INSTAVM_BASE_URL": api.server.url}  # fmt: skip
    ran = subprocess.run(
        [sys.executable, "-m", "instavm", "snapshot", "build", "default", "--pip", PIP_PACKAGE,
         "--env", "FROM_CLI=yes", "--json"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    created = json.loads(ran.stdout)
    assert created["status"] == "creating", created
    ready = sdk.templates._wait_for_snapshot(created["id"])
    assert "== envs: FROM_CLI" in ready["build_log"], ready
    sdk.snapshots.delete(created["id"])


def test_a_build_a_crash_cut_short_is_failed_at_the_next_start(api: Api, sdk: InstaVM) -> None:
    created = sdk.snapshots.create(oci_image="default", build_args={"post_build_cmd": "sleep 3600"})

    def in_post_build() -> bool:
        return "== post_build_cmd" in (sdk.snapshots.get(created["id"])["build_log"] or "")

    assert wait_until(in_post_build, timeout=600), sdk.snapshots.get(created["id"])
    builders = [vm["vm_id"] for vm in sdk.vms.list() if vm.get("status") == "running"]
    assert len(builders) == 1
    api.server.stop(crash=True)
    api.connect(start_server(api.server.data_dir, env=SERVER_ENV))
    restarted = InstaVM(api_key=api.server.admin_key, base_url=api.server.url, auto_start_session=False)
    failed = restarted.snapshots.get(created["id"])
    assert failed["status"] == "failed" and "the server stopped" in failed["failure_reason"], failed
    assert restarted.vms.get(builders[0])["status"] == "terminated"
    restarted.snapshots.delete(created["id"])
