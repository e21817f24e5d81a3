"""QEMU runs confined: as the unprivileged VM user, in a cgroup of its own with
the VM's memory limit, under seccomp; its files and Kiln's are not readable by
others; snapshots, restores and clones still work (through a real server)."""

from __future__ import annotations

import pwd
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from live_api import SMALL, Api, build_images, live_server

from kiln.config import Settings
from kiln.node.confinement import MEMORY_OVERHEAD_MB
from kiln.runtime.jail import VM_USER

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def images() -> None:
    build_images(Settings())


@pytest.fixture(scope="module")
def api(images: None) -> Iterator[Api]:
    with live_server("kiln-confined-") as started:
        yield started


def status_of(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        fields[name] = value.strip()
    return fields


def memory_cgroup_of(pid: int) -> Path:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return Path("/sys/fs/cgroup/memory") / path.lstrip("/")
    raise AssertionError(f"pid {pid} is in no memory cgroup")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_qemu_runs_as_the_vm_user_in_its_cgroup_under_seccomp(api: Api) -> None:
    health = api.http.get("/healthz").json()
    assert health["confinement"]["user"] == VM_USER and health["confinement"]["cgroups"] in ("v1", "v2"), health
    vm = api.create_ok(**SMALL)
    pid = api.qemu_pid(vm["vm_id"])
    status = status_of(pid)
    vm_uid = pwd.getpwnam(VM_USER).pw_uid
    assert status["Uid"].split() == [str(vm_uid)] * 4, status["Uid"]
    assert status["Gid"].split()[0] == str(pwd.getpwnam(VM_USER).pw_gid)
    assert status["Seccomp"] == "2", status["Seccomp"]
    assert status["NoNewPrivs"] == "1"
    assert status["Groups"] == ""
    cgroup = memory_cgroup_of(pid)
    assert cgroup.name == vm["vm_id"]
    limit = int((cgroup / "memory.limit_in_bytes").read_text())
    assert limit == (SMALL["memory_mb"] + MEMORY_OVERHEAD_MB) * 2**20
    run_dir = api.run_dir(vm["vm_id"])
    assert run_dir.stat().st_uid == vm_uid and mode(run_dir) == 0o700
    assert api.run(vm["session_id"], "echo confined").strip() == "confined"
    assert api.delete(vm["vm_id"]).status_code == 200
    assert not cgroup.exists(), "the VM's cgroup outlived it"


def test_snapshot_restore_and_clone_work_confined_and_saved_state_is_private(api: Api) -> None:
    vm = api.create_ok(**SMALL)
    api.run(vm["session_id"], "echo kept > /root/f")
    snapshot = api.http.post(f"/v1/vms/{vm['vm_id']}/snapshot").json()
    assert snapshot["status"] == "ready", snapshot
    directory = api.settings.snapshots_dir / snapshot["snapshot_id"]
    assert mode(directory) == 0o700
    for file in directory.iterdir():
        assert not mode(file) & 0o077, (file, oct(mode(file)))
    clone = api.http.post(f"/v1/vms/{vm['vm_id']}/clone").json()
    restored = api.create_ok(snapshot_id=snapshot["snapshot_id"])
    for other in (clone, restored):
        assert api.run(other["session_id"], "cat /root/f").strip() == "kept"
        assert status_of(api.qemu_pid(other["vm_id"]))["Seccomp"] == "2"
    suspended = api.http.post(f"/v1/vms/{vm['vm_id']}/suspend").json()
    assert suspended["status"] == "suspended"
    assert api.http.post(f"/v1/vms/{vm['vm_id']}/resume").json()["status"] == "running"
    assert api.run(vm["session_id"], "cat /root/f").strip() == "kept"
    for created in (vm, clone, restored):
        api.delete(created["vm_id"])


def test_kiln_files_are_not_readable_by_others(api: Api) -> None:
    data_dir = api.server.data_dir
    assert mode(data_dir / "kiln.db") == 0o600
    for name in ("admin-api-key", "token-secret"):
        assert mode(data_dir / name) == 0o600, name
    # Others may pass through the data dir to reach what is theirs, never list it.
    assert mode(data_dir) & 0o007 in (0, 0o001)
