"""``kill -9`` of the server inside a snapshot, a suspend, a resume and a clone.

The server is killed at several moments after the request went out: fractions
of how long one save of the same VM took just before (the delays only aim the
kill, nothing asserts a time), so they land in different steps of the save. After each
restart: the VM runs (or is suspended, and resumes) with its files, its python
variables and a background process; every snapshot is ``ready`` or
``failed``; deleting a failed one leaves the VM working; a new snapshot
succeeds; and nothing is left on the host that no VM owns (QEMU processes, run
dirs, snapshot directories, host-resource rows).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from live_api import SMALL, Api, build_images, live_server, qemu_pids_under
from live_server import start_server

from kiln.config import Settings

pytestmark = pytest.mark.vm

# When to kill, as fractions of one save of the VM timed just before.
FRACTIONS = (0.2, 0.5, 0.8)
MARKER = "sleep 86401"  # the background process every check looks for
FILE_TEXT = "written before the crash"


@pytest.fixture(scope="module")
def images() -> None:
    build_images(Settings())


@pytest.fixture
def api(images: None) -> Iterator[Api]:
    with live_server("kiln-crash-") as started:
        yield started


def prepare(api: Api) -> tuple[dict, float]:
    """A VM with a file, python state (most of its memory touched, so saves take
    a while) and a background process; and how long one save of it took."""
    vm = api.create_ok(**SMALL)
    session = vm["session_id"]
    api.run(session, f"echo '{FILE_TEXT}' > /root/crash-file; nohup {MARKER} >/dev/null 2>&1 &")
    api.run(session, "answer = 42\nballast = bytearray(150 * 2**20)\nballast[::4096] = b'x' * len(ballast[::4096])",
            language="python")  # fmt: skip
    started = time.monotonic()
    saved = api.http.post(f"/v1/vms/{vm['vm_id']}/snapshot")
    assert saved.status_code == 200 and saved.json()["status"] == "ready", saved.text
    return vm, time.monotonic() - started


def interrupt(api: Api, method: str, path: str, delay: float) -> None:
    """Send the request, kill the server ``delay`` s later, restart it."""

    def send() -> None:
        try:
            api.http.request(method, path, timeout=60)
        except httpx.HTTPError:
            pass  # the server died under it: that is the point

    request = threading.Thread(target=send, daemon=True)
    request.start()
    time.sleep(delay)
    api.server.stop(crash=True)
    request.join(timeout=30)
    api.connect(start_server(api.server.data_dir))
    # Which moment the kill hit shows in what the restart settled (for the log).
    settled = [line for line in api.server.log_tail(200).splitlines() if "cut short" in line]
    print(f"\n{method} {path} killed after {delay:.2f}s: {settled or 'nothing was in progress'}")


def check_vm_survived(api: Api, vm: dict) -> None:
    record = api.vm(vm["vm_id"])
    assert record["status"] in ("running", "suspended"), record.get("failure_reason")
    if record["status"] == "suspended":
        resumed = api.http.post(f"/v1/vms/{vm['vm_id']}/resume")
        assert resumed.status_code == 200, resumed.text
        assert resumed.json()["status"] == "running"
    session = vm["session_id"]
    assert api.run(session, "cat /root/crash-file").strip() == FILE_TEXT
    assert api.run(session, "print(answer, len(ballast))", language="python").split() == ["42", str(150 * 2**20)]
    assert MARKER in api.run(session, "ps -eo args")


def check_snapshots_settled(api: Api, vm: dict) -> None:
    """Every snapshot ready or failed; a failed one can go, the VM keeps working,
    and a new snapshot succeeds."""
    snapshots = [s for s in api.http.get("/v1/snapshots").json() if s["type"] != "base"]
    assert all(s["status"] in ("ready", "failed") for s in snapshots), snapshots
    for snapshot in snapshots:
        if snapshot["status"] == "failed":
            deleted = api.http.delete(f"/v1/snapshots/{snapshot['snapshot_id']}")
            assert deleted.status_code == 200, deleted.text
            assert api.run(vm["session_id"], "echo alive").strip() == "alive"
    fresh = api.http.post(f"/v1/vms/{vm['vm_id']}/snapshot")
    assert fresh.status_code == 200 and fresh.json()["status"] == "ready", fresh.text


def check_nothing_stray(api: Api) -> None:
    """QEMU processes, run dirs and host-resource rows only of live VMs; snapshot
    directories only of snapshot rows."""
    data_dir = api.server.data_dir
    live = {vm["vm_id"] for vm in api.http.get("/v1/vms").json() if vm["status"] == "running"}
    pids = set(qemu_pids_under(data_dir))
    assert pids == {api.qemu_pid(vm_id) for vm_id in live}, (pids, live)
    vms_dir = api.settings.vms_dir
    assert {path.name for path in vms_dir.iterdir()} == live
    with sqlite3.connect(data_dir / "kiln.db") as db:
        owners = {row[0] for row in db.execute("SELECT vm_id FROM host_resources")}
        directories = {Path(row[0]).name for row in db.execute("SELECT directory FROM snapshots")}
    assert owners <= live, owners - live
    snapshots_dir = api.settings.snapshots_dir
    on_disk = {path.name for path in snapshots_dir.iterdir()} if snapshots_dir.is_dir() else set()
    assert on_disk <= directories, on_disk - directories


@pytest.mark.parametrize("fraction", FRACTIONS)
@pytest.mark.parametrize("operation", ["snapshot", "suspend", "resume", "clone"])
def test_kill_9_inside_an_operation(api: Api, operation: str, fraction: float) -> None:
    vm, save_seconds = prepare(api)
    if operation == "resume":
        suspended = api.http.post(f"/v1/vms/{vm['vm_id']}/suspend")
        assert suspended.status_code == 200 and suspended.json()["status"] == "suspended", suspended.text
    # A resume restores about as fast as a save writes: the same delays aim at it.
    interrupt(api, "POST", f"/v1/vms/{vm['vm_id']}/{operation}", fraction * save_seconds)
    try:
        check_vm_survived(api, vm)
        # A clone caught half-made is failed (its env was never stored); a whole one runs.
        for other in api.http.get("/v1/vms/").json():
            if other["vm_id"] != vm["vm_id"]:
                assert other["status"] in ("running", "failed", "terminated"), other
                api.http.delete(f"/v1/vms/{other['vm_id']}")
        check_snapshots_settled(api, vm)
        check_nothing_stray(api)
    finally:
        api.http.delete(f"/v1/vms/{vm['vm_id']}")
