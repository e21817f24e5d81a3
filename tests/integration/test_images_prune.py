"""``kiln images prune`` on a real server's cache with a real VM: after two new
builds, the build nobody uses goes while a VM restored from an old build's base
snapshot keeps running (and can still be suspended and resumed, which reopens
those files by name); once that VM is gone, its build and base snapshot go too.
The server's own pass (``KILN_IMAGE_PRUNE_INTERVAL_SECONDS``) does the same
unasked, and forgets the row of a base snapshot it removed.

The cache is the test's own (``KILN_CACHE_DIR``): prune must never run on the
shared cache other checkouts' VMs stand on. Its "builds" are hard-linked copies
of the shared cache's current default build under new names: to prune they are
builds like any other (their directory names differ, so do their digests),
and making them costs no image build.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from live_api import SMALL, Api, live_server, wait_until
from live_server import ensure_default_image, run_cli

from kiln.config import Settings
from kiln.runtime.images import ImageStore
from kiln.runtime.prune import builds_held

pytestmark = pytest.mark.vm

# No share router: these tests need none, and its fixed port may be another server's.
NO_ROUTER = {"KILN_SHARE_ROUTER": "false"}
OLD, UNUSED, NEW = "default-00000000000000a1", "default-00000000000000a2", "default-00000000000000a3"


@pytest.fixture
def cache() -> Iterator[Path]:
    shared = Settings()
    ensure_default_image(shared)
    image = ImageStore(shared).get("default")
    assert image is not None
    root = Path(tempfile.mkdtemp(prefix="kiln-prune-cache-"))
    (root / "images").mkdir()
    subprocess.run(["cp", "-al", str(image.rootfs.parent), str(root / "images" / OLD)], check=True)
    point_current(root, OLD)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def base_snapshots(cache: Path) -> list[str]:
    root = cache / "base-snapshots"
    return [path.name for path in root.iterdir() if not path.name.startswith(".")] if root.is_dir() else []


def qemu_cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def point_current(cache: Path, build: str) -> None:
    pointer = cache / "images" / "default.current"
    pointer.unlink(missing_ok=True)
    os.symlink(build, pointer)


def prune(api: Api, cache: Path) -> str:
    done = run_cli(api.server.data_dir, "images", "prune", env={"KILN_CACHE_DIR": str(cache)}, timeout=300)
    return done.stderr + done.stdout


def test_prune_frees_old_builds_and_keeps_what_a_running_vm_stands_on(cache: Path) -> None:
    with live_server("kiln-prune-", env={"KILN_CACHE_DIR": str(cache), **NO_ROUTER}) as api:
        # The first create of a shape boots cold and makes OLD's base snapshot beside it;
        # the next one restores from that snapshot (its disk and memory stand on it).
        first = api.create_ok(**SMALL, vm_lifetime_seconds=600)
        assert wait_until(lambda: base_snapshots(cache), 300), "no base snapshot was made"
        [old_base] = base_snapshots(cache)
        api.delete(first["vm_id"])
        vm = api.create_ok(**SMALL, vm_lifetime_seconds=600)
        assert str(cache / "base-snapshots" / old_base) in qemu_cmdline(api.qemu_pid(vm["vm_id"]))
        for build in (UNUSED, NEW):  # two rebuilds; the newest is current
            subprocess.run(["cp", "-al", str(cache / "images" / OLD), str(cache / "images" / build)], check=True)
        point_current(cache, NEW)

        said = prune(api, cache)
        assert sorted(path.name for path in (cache / "images").iterdir()) == sorted([OLD, NEW, "default.current"])
        assert [path.name for path in (cache / "base-snapshots").iterdir()] == [old_base], said
        assert f"remove {UNUSED}" in said and "freed" in said
        # The VM runs on, and what reopens its files by name still works.
        assert api.run(vm["session_id"], "echo alive").strip() == "alive"
        assert api.http.post(f"/v1/vms/{vm['vm_id']}/suspend").json()["status"] == "suspended"
        # Suspended, it has no process: its saved state alone must keep OLD's files.
        prune(api, cache)
        assert (cache / "images" / OLD).is_dir() and (cache / "base-snapshots" / old_base).is_dir()
        resumed = api.http.post(f"/v1/vms/{vm['vm_id']}/resume")
        assert resumed.status_code == 200 and resumed.json()["status"] == "running", resumed.text
        assert api.run(resumed.json()["session_id"], "echo back").strip() == "back"

        assert api.delete(resumed.json()["vm_id"]).json()["status"] == "terminated"
        # The resumed VM's disk stood on its suspend state; the server's snapshot GC
        # (every minute) removes that state once the VM is gone. Until then it is kept.
        saved = api.settings.snapshots_dir
        assert wait_until(lambda: not any(saved.iterdir()), 240), "the suspend state was never collected"
        said = prune(api, cache)
        assert sorted(path.name for path in (cache / "images").iterdir()) == sorted([NEW, "default.current"]), said
        assert list((cache / "base-snapshots").iterdir()) == []


def base_rows(api: Api) -> list[str]:
    with sqlite3.connect(api.server.data_dir / "kiln.db") as db:
        return [row[0] for row in db.execute("select directory from snapshots where type = 'base'")]


def test_the_servers_own_pass_removes_what_nothing_needs(cache: Path) -> None:
    env = {"KILN_CACHE_DIR": str(cache), "KILN_IMAGE_PRUNE_INTERVAL_SECONDS": "1", **NO_ROUTER}
    with live_server("kiln-autoprune-", env=env) as api:
        first = api.create_ok(**SMALL, vm_lifetime_seconds=600)
        assert wait_until(lambda: base_snapshots(cache), 300), "no base snapshot was made"
        [old_base] = base_snapshots(cache)
        api.delete(first["vm_id"])
        vm = api.create_ok(**SMALL, vm_lifetime_seconds=600)
        assert str(cache / "base-snapshots" / old_base) in qemu_cmdline(api.qemu_pid(vm["vm_id"]))
        assert [Path(directory).name for directory in base_rows(api)] == [old_base]
        # Two rebuilds, made as `kiln images build` makes one: under the builds' lock, so
        # no pass sees a build in place before the pointer names it.
        with builds_held(Settings(cache_dir=cache), wait=True):
            for build in (UNUSED, NEW):
                subprocess.run(["cp", "-al", str(cache / "images" / OLD), str(cache / "images" / build)], check=True)
            point_current(cache, NEW)

        assert wait_until(lambda: not (cache / "images" / UNUSED).exists(), 120), "the pass never removed it"
        # OLD and its base snapshot back the running VM: kept, and the VM runs on.
        assert (cache / "images" / OLD).is_dir() and (cache / "images" / NEW).is_dir()
        assert base_snapshots(cache) == [old_base]
        assert api.run(vm["session_id"], "echo alive").strip() == "alive"

        api.delete(vm["vm_id"])
        # One pass removes both, the build first.
        gone = wait_until(lambda: not (cache / "images" / OLD).exists() and base_snapshots(cache) == [], 120)
        assert gone, "OLD or its base snapshot outlived the last VM on them"
        assert (cache / "images" / NEW).is_dir()
        # The removed base snapshot's row goes with it: nobody is offered it any more.
        assert wait_until(lambda: base_rows(api) == [], 30), base_rows(api)
