"""Volumes through a real ``kiln serve`` with real VMs (issue 13's "Done when").

One server serves the module (``KILN_QUOTA_DISK_MB`` small enough to hit);
each test deletes the VMs and volumes it made through the API, and the module
ends by checking that nothing of them is left on the host: no helper VM, no
attachment record, no throwaway layer, no mount row, no volume directory.
The crash test has a server of its own (it kills it).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import signal
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from live_api import SMALL, Api, build_images, live_server, process_exists, wait_until
from live_server import start_server
from unit.harness import add_user
from volumes_fixtures import require_host_tools

from kiln.config import Settings

pytestmark = pytest.mark.vm

MiB = 1024 * 1024
QUOTA_DISK_MB = 4096


@pytest.fixture(scope="module")
def images() -> None:
    require_host_tools()
    build_images(Settings())


@pytest.fixture(scope="module")
def api(images: None) -> Iterator[Api]:
    with live_server("kiln-volapi-", env={"KILN_QUOTA_DISK_MB": str(QUOTA_DISK_MB)}) as started:
        yield started
        assert_nothing_left(started)


@pytest.fixture
def made(api: Api) -> Iterator[list[str]]:
    """Volumes a test makes (deleted at its end, once its VMs are gone)."""
    volumes: list[str] = []
    yield volumes
    for vm in api.http.get("/v1/vms").json():
        api.delete(vm["vm_id"])
    for volume_id in volumes:
        response = api.http.delete(f"/v1/volumes/{volume_id}")
        assert response.status_code in (200, 404), response.text


def new_volume(api: Api, made: list[str], quota_bytes: int = 64 * MiB, name: str = "data") -> dict:
    response = api.http.post("/v1/volumes", json={"name": name, "quota_bytes": quota_bytes})
    assert response.status_code == 200, response.text
    made.append(response.json()["id"])
    return response.json()


def shell(api: Api, session_id: str, command: str) -> dict:
    response = api.http.post("/execute", json={"session_id": session_id, "command": command, "language": "bash"})
    assert response.status_code == 200, response.text
    return response.json()


def mount(api: Api, vm_id: str, volume_id: str, path: str, **fields: object) -> httpx.Response:
    return api.http.post(f"/v1/vms/{vm_id}/volumes", json={"volume_id": volume_id, "mount_path": path, **fields})


def unmount(api: Api, vm_id: str, volume_id: str, path: str) -> httpx.Response:
    return api.http.delete(f"/v1/vms/{vm_id}/volumes/{volume_id}", params={"mount_path": path})


def assert_nothing_left(api: Api) -> None:
    """After every VM and volume of the module was deleted: nothing of them
    remains (the helper VM waits a while for work before it goes)."""
    settings = api.settings
    assert wait_until(lambda: not list(settings.vms_dir.glob("volh-*")), 60), "a helper VM was left"
    left = list(settings.volumes_dir.glob("*")) if settings.volumes_dir.exists() else []
    assert not left, f"volume files left: {left}"
    with sqlite3.connect(settings.data_dir / "kiln.db") as db:
        assert db.execute("select count(*) from volume_mounts").fetchone() == (0,)
        assert db.execute("select count(*) from volumes").fetchone() == (0,)
        kinds = [row[0] for row in db.execute("select kind from host_resources")]
    assert not [kind for kind in kinds if kind.startswith("volume")], kinds


def test_data_written_by_one_vm_is_read_by_a_later_vm_and_ro_refuses_writes(api: Api, made: list[str]) -> None:
    volume = new_volume(api, made)
    first = api.create_ok(**SMALL, volumes=[{"volume_id": volume["id"], "mount_path": "/data"}])
    record = api.vm(first["vm_id"])
    assert record["volumes"] == [
        {"volume_id": volume["id"], "mount_path": "/data", "mode": "rw", "checkpoint_id": None, "status": "mounted"}
    ]
    api.run(first["session_id"], "echo 'from the first VM' > /data/note && sync")
    # Not synced: deleting the VM unmounts cleanly (the guest syncs) before QEMU goes.
    api.run(first["session_id"], "echo 'left in the page cache' > /data/unsynced")
    assert api.delete(first["vm_id"]).status_code == 200

    later = api.create_ok(**SMALL, volumes=[{"volume_id": volume["id"], "mount_path": "/mnt/in", "mode": "ro"}])
    read = api.run(later["session_id"], "cat /mnt/in/note /mnt/in/unsynced")
    assert read == "from the first VM\nleft in the page cache\n"
    refused = shell(api, later["session_id"], "echo more > /mnt/in/other")
    assert refused["exit_code"] != 0 and "Read-only file system" in refused["stderr"]
    # The device itself is read-only too, not just the mount.
    device = api.run(later["session_id"], "grep ' /mnt/in ' /proc/mounts | cut -d' ' -f1").strip()
    assert api.run(later["session_id"], f"cat /sys/block/{Path(device).name}/ro") == "1\n"


def test_the_quota_holds_in_the_guest_and_for_the_user(api: Api, made: list[str]) -> None:
    volume = new_volume(api, made, quota_bytes=32 * MiB)
    vm = api.create_ok(**SMALL, volumes=[{"volume_id": volume["id"], "mount_path": "/data"}])
    full = shell(api, vm["session_id"], "dd if=/dev/urandom of=/data/big bs=1M count=64 conv=fsync")
    assert full["exit_code"] != 0 and "No space left on device" in full["stderr"]
    counted = api.http.get(f"/v1/volumes/{volume['id']}", params={"refresh_usage": "true"}).json()
    assert 24 * MiB < counted["used_bytes"] <= 32 * MiB, counted
    assert counted["status"] == "in_use"
    # The user's disk quota: volumes count with the size they may grow to.
    too_big = api.http.post("/v1/volumes", json={"name": "huge", "quota_bytes": QUOTA_DISK_MB * MiB})
    assert too_big.status_code == 429 and "quota disk_mb" in too_big.json()["detail"], too_big.text
    grow = api.http.patch(f"/v1/volumes/{volume['id']}", json={"quota_bytes": (QUOTA_DISK_MB + 1) * MiB})
    assert grow.status_code == 429, grow.text
    # Online growth through the VM that mounts it, then room again.
    grown = api.http.patch(f"/v1/volumes/{volume['id']}", json={"quota_bytes": 96 * MiB, "name": "bigger"})
    assert grown.status_code == 200 and grown.json()["name"] == "bigger", grown.text
    api.run(vm["session_id"], "dd if=/dev/zero of=/data/more bs=1M count=32 conv=fsync 2>/dev/null")
    # Shrinking is offline only; below what it holds it is refused even then.
    assert api.http.patch(f"/v1/volumes/{volume['id']}", json={"quota_bytes": 40 * MiB}).status_code == 409
    api.delete(vm["vm_id"])
    small = api.http.patch(f"/v1/volumes/{volume['id']}", json={"quota_bytes": 16 * MiB})
    assert small.status_code == 409 and "holds" in small.json()["detail"], small.text


def test_rw_is_exclusive_ro_is_shared_and_mounted_things_stay(api: Api, made: list[str]) -> None:
    volume = new_volume(api, made)
    vid = volume["id"]
    writer = api.create_ok(**SMALL, volumes=[{"volume_id": vid, "mount_path": "/data"}])
    for mode in ("rw", "ro"):
        busy = api.create(**SMALL, volumes=[{"volume_id": vid, "mount_path": "/data", "mode": mode}])
        assert busy.status_code == 409 and "mounted rw in" in busy.json()["detail"], busy.text
    assert api.http.delete(f"/v1/volumes/{vid}").status_code == 409
    checkpoint = api.http.post(f"/v1/volumes/{vid}/checkpoints", json={"name": "c"}).json()
    on_checkpoint = mount(api, writer["vm_id"], vid, "/old", mode="ro", checkpoint_id=checkpoint["id"])
    assert on_checkpoint.status_code == 200, on_checkpoint.text
    assert api.http.delete(f"/v1/volumes/{vid}/checkpoints/{checkpoint['id']}").status_code == 409
    assert unmount(api, writer["vm_id"], vid, "/old").status_code == 200
    assert unmount(api, writer["vm_id"], vid, "/data").status_code == 200
    assert api.vm(writer["vm_id"])["volumes"] == []

    readers = [api.create_ok(**SMALL, volumes=[{"volume_id": vid, "mount_path": "/r", "mode": "ro"}]) for _ in "ab"]
    assert api.create(**SMALL, volumes=[{"volume_id": vid, "mount_path": "/w"}]).status_code == 409
    assert mount(api, writer["vm_id"], vid, "/w").status_code == 409
    # Another user sees none of it, and cannot mount it in a VM of theirs.
    other = {"X-API-Key": asyncio.run(add_user(api.settings, "other-user"))}
    assert api.http.get(f"/v1/volumes/{vid}", headers=other).status_code == 404
    assert api.http.get("/v1/volumes", headers=other).json() == []
    borrowed = {**SMALL, "volumes": [{"volume_id": vid, "mount_path": "/x", "mode": "ro"}]}
    theirs = api.http.post("/v1/vms", headers=other, json=borrowed)
    assert theirs.status_code == 404, theirs.text
    for reader in readers:
        api.delete(reader["vm_id"])
    remounted = mount(api, writer["vm_id"], vid, "/w")
    assert remounted.status_code == 200, (remounted.text, api.vm(writer["vm_id"])["failure_reason"])
    assert api.http.delete(f"/v1/volumes/{vid}/checkpoints/{checkpoint['id']}").status_code == 200


def test_a_checkpoint_keeps_the_old_content_while_the_volume_moves_on(api: Api, made: list[str]) -> None:
    volume = new_volume(api, made)
    vid = volume["id"]
    vm = api.create_ok(**SMALL, volumes=[{"volume_id": vid, "mount_path": "/data"}])
    session = vm["session_id"]
    api.run(session, "echo old > /data/state")  # not synced: the freeze flushes it
    checkpoint = api.http.post(f"/v1/volumes/{vid}/checkpoints", json={"name": "before"})
    assert checkpoint.status_code == 200, checkpoint.text
    cp = checkpoint.json()
    assert [c["id"] for c in api.http.get(f"/v1/volumes/{vid}/checkpoints").json()] == [cp["id"]]
    api.run(session, "echo new > /data/state && sync")
    assert mount(api, vm["vm_id"], vid, "/old", mode="ro", checkpoint_id=cp["id"]).status_code == 200
    assert api.run(session, "cat /old/state /data/state") == "old\nnew\n"
    # A rw mount of the checkpoint writes a throwaway layer: neither changes.
    assert mount(api, vm["vm_id"], vid, "/scratch", checkpoint_id=cp["id"]).status_code == 200
    api.run(session, "echo scribble > /scratch/state && sync && cat /scratch/state")
    assert unmount(api, vm["vm_id"], vid, "/scratch").status_code == 200
    assert mount(api, vm["vm_id"], vid, "/scratch", checkpoint_id=cp["id"]).status_code == 200
    assert api.run(session, "cat /scratch/state /old/state /data/state") == "old\nold\nnew\n"


def test_hot_attach_and_detach_survive_suspend_resume_and_a_snapshot_restore(api: Api, made: list[str]) -> None:
    volume = new_volume(api, made)
    vid = volume["id"]
    vm = api.create_ok(**SMALL)
    vm_id, session = vm["vm_id"], vm["session_id"]
    attached = mount(api, vm_id, vid, "/data")
    assert attached.status_code == 200 and attached.json()["status"] == "mounted", attached.text
    assert [m["mount_path"] for m in api.http.get(f"/v1/vms/{vm_id}/volumes").json()] == ["/data"]
    api.run(session, "echo before > /data/f && sync")

    suspended = api.http.post(f"/v1/vms/{vm_id}/suspend")
    assert suspended.status_code == 200 and suspended.json()["status"] == "suspended", suspended.text
    # A suspended VM keeps its volume: nobody else may mount it rw meanwhile.
    assert api.create(**SMALL, volumes=[{"volume_id": vid, "mount_path": "/x"}]).status_code == 409
    resumed = api.http.post(f"/v1/vms/{vm_id}/resume")
    assert resumed.status_code == 200 and resumed.json()["status"] == "running", resumed.text
    assert api.run(session, "cat /data/f; grep -c ' /data ext4 rw' /proc/mounts") == "before\n1\n"

    snapshot = api.http.post(f"/v1/vms/{vm_id}/snapshot", json={"name": "with volume"})
    assert snapshot.status_code == 200 and snapshot.json()["status"] == "ready", snapshot.text
    api.run(session, "echo after > /data/f && sync")
    # While the VM runs with it rw, the snapshot's restore cannot have the volume.
    busy = api.create(snapshot_id=snapshot.json()["id"])
    assert busy.status_code == 409 and vid in busy.json()["detail"], busy.text
    clone = api.http.post(f"/v1/vms/{vm_id}/clone", json={})
    assert clone.status_code == 409 and "clone" in clone.json()["detail"], clone.text
    api.delete(vm_id)

    restored = api.create_ok(snapshot_id=snapshot.json()["id"])
    assert api.vm(restored["vm_id"])["volumes"][0]["mount_path"] == "/data"
    # The restored VM has the volume as it is now (a volume outlives snapshots).
    assert api.run(restored["session_id"], "cat /data/f; grep -c ' /data ext4 rw' /proc/mounts") == "after\n1\n"
    api.run(restored["session_id"], "echo restored >> /data/f && sync")
    assert unmount(api, restored["vm_id"], vid, "/data").status_code == 200
    assert api.run(restored["session_id"], "grep -c ' /data ' /proc/mounts || true") == "0\n"
    # The volume kept every write, and the restore left no stand-in drive behind.
    assert mount(api, restored["vm_id"], vid, "/again").status_code == 200
    assert api.run(restored["session_id"], "cat /again/f") == "after\nrestored\n"
    assert unmount(api, restored["vm_id"], vid, "/again").status_code == 200
    # A snapshot whose volume was deleted says so.
    gone = new_volume(api, made, name="short-lived")
    assert mount(api, restored["vm_id"], gone["id"], "/gone").status_code == 200
    saved = api.http.post(f"/v1/vms/{restored['vm_id']}/snapshot").json()
    assert unmount(api, restored["vm_id"], gone["id"], "/gone").status_code == 200
    assert api.http.delete(f"/v1/volumes/{gone['id']}").status_code == 200
    refused = api.create(snapshot_id=saved["id"])
    assert refused.status_code == 409 and "is gone" in refused.json()["detail"], refused.text
    # Deleting the snapshots lets go of what they kept of the volume.
    api.delete(restored["vm_id"])
    for snapshot_id in (saved["id"], snapshot.json()["id"]):
        assert api.http.delete(f"/v1/snapshots/{snapshot_id}").status_code == 200
    info = api.http.get(f"/v1/volumes/{vid}/checkpoints").json()
    assert info == []


def test_files_round_trip_mounted_and_unmounted_and_no_symlink_leads_out(api: Api, made: list[str]) -> None:
    vid = new_volume(api, made)["id"]
    payload = os.urandom(700_000) + bytes(range(256))
    digest = hashlib.sha256(payload).hexdigest()

    def upload(path: str, data: bytes, overwrite: bool = False) -> httpx.Response:
        return api.http.post(
            f"/v1/volumes/{vid}/files/upload",
            files={"file": ("blob.bin", data)},
            data={"path": path, "overwrite": str(overwrite).lower()},
        )

    def download(path: str) -> httpx.Response:
        return api.http.post(f"/v1/volumes/{vid}/files/download", json={"path": path})

    # Unmounted: a helper VM does the work.
    assert upload("dir/blob.bin", payload).json() == {"success": True, "path": "dir/blob.bin", "size": len(payload)}
    assert upload("dir/blob.bin", b"x").status_code == 409
    got = download("dir/blob.bin").json()
    assert got["filename"] == "blob.bin" and got["size"] == len(payload)
    assert hashlib.sha256(base64.b64decode(got["content"])).hexdigest() == digest
    listing = api.http.get(f"/v1/volumes/{vid}/files", params={"recursive": "true"}).json()
    assert {(e["path"], e["is_dir"]) for e in listing} >= {("dir", True), ("dir/blob.bin", False)}

    # Mounted: through the VM, which sees the same file.
    vm = api.create_ok(**SMALL, volumes=[{"volume_id": vid, "mount_path": "/data"}])
    assert api.run(vm["session_id"], "sha256sum /data/dir/blob.bin | cut -d' ' -f1") == digest + "\n"
    api.run(
        vm["session_id"],
        "ln -s /etc /data/escape && ln -s ../../etc/passwd /data/dir/pw"
        " && mkdir /data/d2 && echo 1 > /data/d2/a && echo 2 > /data/d2/b && sync",
    )
    for path in ("escape/passwd", "dir/pw", "../etc/passwd", "escape/hostname"):
        refused = download(path)
        assert refused.status_code in (400, 404) and "root:" not in refused.text, (path, refused.text)
    assert download("escape/passwd").status_code == 400
    assert upload("escape/planted", b"x").status_code == 400
    assert upload("dir/blob.bin", b"replaced", overwrite=True).json()["size"] == 8
    assert api.run(vm["session_id"], "cat /data/dir/blob.bin") == "replaced"
    names = [e["path"] for e in api.http.get(f"/v1/volumes/{vid}/files", params={"prefix": "d2/", "limit": 1}).json()]
    assert len(names) == 1 and names[0].startswith("d2/")
    assert api.http.delete(f"/v1/volumes/{vid}/files", params={"path": "d2"}).status_code == 409
    assert api.http.delete(f"/v1/volumes/{vid}/files", params={"path": "d2", "recursive": "true"}).status_code == 200
    assert api.http.delete(f"/v1/volumes/{vid}/files", params={"path": "escape"}).status_code == 200
    listed = api.run(vm["session_id"], "ls /data; test -f /etc/passwd && echo etc-still-there")
    assert listed == "dir\nlost+found\netc-still-there\n"
    api.delete(vm["vm_id"])

    # Unmounted again, with the binary bytes the VM left.
    assert base64.b64decode(download("dir/blob.bin").json()["content"]) == b"replaced"
    assert download("nothing/here").status_code == 404


@pytest.fixture
def crash_api(images: None) -> Iterator[Api]:
    with live_server("kiln-volcrash-") as started:
        yield started


def test_kill_9_of_the_server_and_of_qemu_loses_no_synced_write(crash_api: Api) -> None:
    api = crash_api
    volume = api.http.post("/v1/volumes", json={"name": "crash", "quota_bytes": 64 * MiB}).json()
    vm = api.create_ok(**SMALL, volumes=[{"volume_id": volume["id"], "mount_path": "/data"}])
    api.run(vm["session_id"], "echo first > /data/a && sync")

    api.server.stop(crash=True)
    api.connect(start_server(api.server.data_dir))
    # The VM was adopted with its volume; it goes on writing.
    assert api.vm(vm["vm_id"])["status"] == "running"
    api.run(vm["session_id"], "echo second > /data/b && sync")

    pid = api.qemu_pid(vm["vm_id"])
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: not process_exists(pid), 10)
    assert wait_until(lambda: api.vm(vm["vm_id"])["status"] == "failed", 30), api.vm(vm["vm_id"])
    # Its mount goes once its drives are released (the status is set first).
    assert wait_until(lambda: api.vm(vm["vm_id"])["volumes"] == [], 30), api.vm(vm["vm_id"])

    # Checked on the host first (the VM died with it mounted rw), then mounted again.
    later = api.create_ok(**SMALL, volumes=[{"volume_id": volume["id"], "mount_path": "/data"}])
    assert api.run(later["session_id"], "cat /data/a /data/b") == "first\nsecond\n"
    api.run(later["session_id"], "echo third > /data/d && sync")
    assert "volume" in api.server.log_tail(400) and "checking it first" in api.server.log_tail(400)
    api.delete(later["vm_id"])
    api.delete(vm["vm_id"])
    assert api.http.delete(f"/v1/volumes/{volume['id']}").status_code == 200
    assert not (api.settings.volumes_dir / volume["id"]).exists()


def test_bad_requests_are_clear_4xx(api: Api, made: list[str]) -> None:
    post = api.http.post
    assert post("/v1/volumes", json={"name": "x", "quota_bytes": 1}).status_code == 422
    assert post("/v1/volumes", json={"name": "", "quota_bytes": 64 * MiB}).status_code == 422
    unknown = post("/v1/volumes", json={"name": "x", "quota_bytes": 64 * MiB, "encrypted": True})
    assert unknown.status_code == 422 and unknown.json()["detail"][0]["loc"] == ["body", "encrypted"]
    assert api.http.get("/v1/volumes/vol-nope").status_code == 404
    vid = new_volume(api, made)["id"]
    vm = api.create_ok(**SMALL)
    for path in ("/", "/etc", "relative", "/data/../etc", "/proc/x"):
        response = mount(api, vm["vm_id"], vid, path)
        assert response.status_code == 422, (path, response.text)
    assert mount(api, vm["vm_id"], vid, "/data", mode="rwx").status_code == 422
    assert mount(api, vm["vm_id"], "vol-nope", "/data").status_code == 404
    assert mount(api, vm["vm_id"], vid, "/data", checkpoint_id="cp-nope").status_code == 404
    assert mount(api, "vm-nope", vid, "/data").status_code == 404
    assert unmount(api, vm["vm_id"], vid, "/data").status_code == 404
    created = api.create(**SMALL, volumes=[{"volume_id": "vol-nope", "mount_path": "/data"}])
    assert created.status_code == 404 and "vol-nope" in created.json()["detail"]
    # Nothing of those refusals was made.
    assert len(api.http.get("/v1/vms").json()) == 1
    assert Path(api.settings.volumes_dir / vid).is_dir()


def test_attach_and_detach_are_events_in_the_audit_log(api: Api, made: list[str]) -> None:
    at_create, hot = new_volume(api, made, name="at-create"), new_volume(api, made, name="hot")
    vm = api.create_ok(**SMALL, volumes=[{"volume_id": at_create["id"], "mount_path": "/a"}])
    vm_id = vm["vm_id"]
    assert mount(api, vm_id, hot["id"], "/h", mode="ro").status_code == 200
    assert unmount(api, vm_id, hot["id"], "/h").status_code == 200
    api.delete(vm_id)  # the create's mount ends with the VM
    answer = api.http.get("/v1/audit/events", params={"vm_id": vm_id, "event_group": "volume", "limit": 50})
    assert answer.status_code == 200, answer.text
    seen = [
        (e["event_type"], e["resource_id"], e["event_payload"]["mount_path"], e["status"])
        for e in reversed(answer.json()["items"])
    ]
    assert seen == [
        ("volume.attached", at_create["id"], "/a", "success"),
        ("volume.attached", hot["id"], "/h", "success"),
        ("volume.detached", hot["id"], "/h", "success"),
        ("volume.detached", at_create["id"], "/a", "success"),
    ]
