"""POST /v1/vms and the VM lifecycle through a real ``kiln serve`` over HTTP, with
real QEMU VMs (TCG is fine) and nothing mocked.

One server serves most of the module (``api``). Tests whose server needs other
settings start their own: admission limits, a crash and restart, a broken image.
Creates use shapes whose base snapshot the ``images`` fixture makes sure is
cached (the Settings default 512 MB / 2 vCPUs, and 256 MB / 1 vCPU for both
variants), so they restore in about half a second; the shape test adds one
other shape (1024 MB / 3 vCPUs), which cold-boots once per image build (the
server then caches its base snapshot).

Every VM is deleted through the API; at the end of each server no QEMU process
whose command line names its data dir may remain (checked from /proc, never by
killing processes by name: other people's VMs run on this machine).

MemTotal. The guest kernel keeps part of RAM for itself, so MemTotal is below
``memory_mb``. Measured with the Debian cloud kernel 6.1 (default image):

    memory_mb   MemTotal      share
    256         222756 kB     85.0 %
    512         480176 kB     91.6 %
    1024        995256 kB     94.9 %

That is one struct page (64 bytes) per 4 KiB page, 1/64 of RAM, plus a constant
of about 35 MB: the kernel image left after boot (about 24.5 MB of its 33 MB;
init code and alignment gaps are freed), the first megabyte (always reserved on
x86), page-table and per-CPU areas, hash tables and the mem_section roots of
5-level paging (about 1 MB; ``no5lvl`` frees it). No swiotlb or crashkernel area
is reserved (checked with ``memblock=debug``), so there is nothing to win from
the command line beyond that megabyte. So the assertion is ``MemTotal = memory_mb * 63/64 - C`` with C
between 33 and 38 MiB: a 5 MiB band, whatever the size.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import websockets.sync.client
from live_api import (
    DEFAULT_SHAPE,
    DEFAULTS,
    SMALL,
    Api,
    assert_gone,
    build_images,
    live_server,
    parse_time,
    process_exists,
    qemu_pids_under,
    wait_until,
)
from live_server import short_data_dir, start_server

from kiln.config import Settings
from kiln.runtime.images import ImageStore

pytestmark = pytest.mark.vm

# See the module docstring: MemTotal = memory * 63/64 - C, C in this range (KiB).
KERNEL_OVERHEAD_KIB = (33 * 1024, 38 * 1024)
# The reaper runs every second; termination (SIGTERM to QEMU) takes a moment more.
REAPER_LAG_SECONDS = 2.5
# The watchdog looks every two seconds.
WATCHDOG_NOTICE_SECONDS = 6.0

ENV = {
    "PLAIN": "value",
    "SPACES": "  two  spaces,\ta tab and a trailing space ",
    "QUOTES": "it's \"double\" and 'single'",
    "SHELLISH": "$HOME ${PATH} `id` $(id) \\ back\\slash \\n not a newline",
    "UNICODE": "héllo wörld ☃ 日本語 🚀",
    "EQUALS": "a=b=c",
    "HASH": "value # not a comment",
    "EMPTY": "",
}


@pytest.fixture(scope="module")
def images() -> None:
    build_images(Settings())


@pytest.fixture(scope="module")
def api(images: None) -> Iterator[Api]:
    with live_server("kiln-vmapi-") as started:
        yield started


# ---- the module's server ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("memory_mb", "vcpu_count"),
    [(256, 1), (DEFAULTS.default_memory_mb, DEFAULTS.default_vcpu_count), (1024, 3)],
)
def test_the_guest_has_the_cpus_and_memory_asked_for(
    api: Api, memory_mb: int, vcpu_count: int
) -> None:
    created = api.create_ok(memory_mb=memory_mb, vcpu_count=vcpu_count)
    record = api.vm(created["vm_id"])
    assert (record["memory_mb"], record["vcpu_count"]) == (memory_mb, vcpu_count)
    output = api.run(created["session_id"], "nproc; grep MemTotal /proc/meminfo")
    nproc, meminfo = output.splitlines()
    assert int(nproc) == vcpu_count
    mem_total_kib = int(meminfo.split()[1])
    print(
        f"\n{memory_mb} MB / {vcpu_count} vCPU: MemTotal {mem_total_kib} kB "
        f"({100 * mem_total_kib / (memory_mb * 1024):.2f}%)"
    )
    usable = memory_mb * 1024 * 63 // 64
    low, high = KERNEL_OVERHEAD_KIB
    assert usable - high <= mem_total_kib <= usable - low
    assert api.delete(created["vm_id"]).status_code == 200


def test_env_reaches_every_process_and_etc_environment(api: Api) -> None:
    created = api.create_ok(env=ENV)  # the default shape
    assert (created["status"], created["env_status"], created["env_error"]) == (
        "running", "applied", None
    )  # fmt: skip
    record = api.vm(created["vm_id"])
    assert (record["memory_mb"], record["vcpu_count"]) == tuple(DEFAULT_SHAPE.values())
    sid = created["session_id"]
    names = list(ENV)

    # A bash process the agent starts: its variables, NUL-separated, in base64.
    dump = f"for n in {' '.join(names)}; do printf '%s\\0' \"${{!n}}\"; done | base64 -w0"
    bash = api.run(sid, dump)
    assert base64.b64decode(bash).decode().split("\0")[:-1] == list(ENV.values())

    # The session's python interpreter.
    python = api.run(
        sid, f"import os, json; print(json.dumps({{n: os.environ[n] for n in {names!r}}}))", "python"
    )
    assert json.loads(python) == ENV

    # /etc/environment, read as a POSIX shell reads it, with nothing inherited.
    sourced = api.run(
        sid,
        "env -i /bin/sh -c 'set -a; . /etc/environment; exec python3 -c "
        '"import os, json; print(json.dumps(dict(os.environ)))"\'',
    )
    from_file = json.loads(sourced)
    assert {name: from_file.get(name) for name in names} == ENV

    # A terminal's process (the same dump, between markers).
    pty = api.http.post(
        f"/v1/sessions/{sid}/pty/sessions",
        json={"command": f"printf ENV:; {dump}; printf :END; sleep 60"},
    )
    assert pty.status_code == 200, pty.text
    pty_id = pty.json()["session_id"]
    url = api.server.url.replace("http", "ws", 1) + f"/v1/sessions/{sid}/pty/{pty_id}/connect"
    seen = b""
    with websockets.sync.client.connect(f"{url}?api_key={api.server.admin_key}") as socket:
        while b":END" not in seen:
            message = socket.recv(timeout=30)
            seen += message if isinstance(message, bytes) else message.encode()
    encoded = seen.split(b"ENV:")[-1].split(b":END")[0]
    assert base64.b64decode(encoded).decode().split("\0")[:-1] == list(ENV.values())
    api.http.delete(f"/v1/sessions/{sid}/pty/sessions/{pty_id}")
    assert api.delete(created["vm_id"]).status_code == 200


@pytest.mark.parametrize("variant", ["default", "minimal", None])
def test_image_variants_boot(api: Api, variant: str | None) -> None:
    created = api.create_ok(image_variant=variant, **SMALL)
    assert created["status"] == "running"
    record = api.vm(created["vm_id"])
    assert record["image_variant"] == (variant or "default")
    # Each image's own os-release, read by a process in that guest.
    assert "bookworm" in api.run(created["session_id"], "cat /etc/os-release")
    # The minimal rootfs has no git; the default one has.
    has_git = api.run(created["session_id"], "command -v git >/dev/null && echo yes || echo no")
    assert has_git.strip() == ("no" if variant == "minimal" else "yes")
    assert api.delete(created["vm_id"]).status_code == 200


def test_an_unknown_variant_is_422_and_starts_nothing(api: Api) -> None:
    before = set(api.settings.vms_dir.glob("*"))
    response = api.create(image_variant="no-such-variant", **SMALL)
    assert response.status_code == 422
    (problem,) = response.json()["detail"]
    assert problem["loc"] == ["body", "image_variant"]
    assert "no-such-variant" in problem["msg"]
    assert set(api.settings.vms_dir.glob("*")) == before


def test_wait_false_answers_creating_then_the_vm_runs_with_its_env(api: Api) -> None:
    started = time.monotonic()
    created = api.create_ok(wait=False, env={"GREETING": "hello there"}, **SMALL)
    answered = time.monotonic() - started
    assert (created["status"], created["env_status"]) == ("creating", "pending")
    record = api.wait_for(created["vm_id"], {"running", "failed"}, 60)
    assert (record["status"], record["env_status"], record["env_error"]) == (
        "running", "applied", None
    )  # fmt: skip
    print(f"\nwait=false answered in {answered * 1000:.0f} ms")
    assert api.run(created["session_id"], 'printf %s "$GREETING"') == "hello there"
    assert api.delete(created["vm_id"]).status_code == 200


def test_metadata_is_stored_and_sessions_bind_vms(api: Api) -> None:
    metadata = {"team": "kiln", "nested": {"n": 1, "list": [1, "two"]}, "ünï": "cödé"}
    session_id = f"test-session-{uuid.uuid4().hex[:8]}"
    given = api.create_ok(session_id=session_id, metadata=metadata, **SMALL)
    assert given["session_id"] == session_id
    record = api.vm(given["vm_id"])
    assert record["metadata"] == metadata
    assert record["session_id"] == session_id
    status = api.http.get(f"/v1/sessions/status/{session_id}").json()
    assert (status["vm_id"], status["vm_status"]) == (given["vm_id"], "active")
    listed = api.http.get("/v1/vms", params={"metadata": json.dumps({"team": "kiln"})}).json()
    assert [vm["vm_id"] for vm in listed] == [given["vm_id"]]
    # A session holds one live VM at a time.
    assert api.create(session_id=session_id, **SMALL).status_code == 409

    generated = api.create_ok(**SMALL)
    assert str(uuid.UUID(generated["session_id"])) == generated["session_id"]
    assert generated["session_id"] != session_id
    assert api.vm(generated["vm_id"])["metadata"] == {}
    status = api.http.get(f"/v1/sessions/status/{generated['session_id']}").json()
    assert status["vm_id"] == generated["vm_id"]
    for created in (given, generated):
        assert api.delete(created["vm_id"]).status_code == 200


def test_lifetime_expiry_and_patch_extends_it(api: Api) -> None:
    # Lifetimes long enough that the creates themselves never outlast them on a busy host.
    short = api.create_ok(vm_lifetime_seconds=20, **SMALL)
    short_pid = api.qemu_pid(short["vm_id"])
    extended = api.create_ok(vm_lifetime_seconds=20, **SMALL)
    first_expiry = parse_time(api.vm(extended["vm_id"])["expires_at"])
    patched = api.http.patch(f"/v1/vms/{extended['vm_id']}", json={"vm_lifetime_seconds": 30})
    assert patched.status_code == 200, patched.text
    assert parse_time(patched.json()["expires_at"]) > time.time() + 25

    expires_at = parse_time(api.vm(short["vm_id"])["expires_at"])
    record = api.wait_for(short["vm_id"], {"terminating", "terminated", "failed"}, 60)
    lag = time.time() - expires_at
    print(f"\nthe reaper ended the VM {lag:.2f}s after expires_at")
    assert record["status"] in ("terminating", "terminated")
    assert lag > -0.5  # never before its time (how soon after is printed, not asserted)
    assert api.wait_for(short["vm_id"], {"terminated"}, 10)["status"] == "terminated"
    assert_gone(api, short["vm_id"], short_pid)

    # Past its first expiry the extended VM still runs and answers.
    time.sleep(max(0.0, first_expiry + REAPER_LAG_SECONDS - time.time()))
    assert api.vm(extended["vm_id"])["status"] == "running"
    assert api.run(extended["session_id"], "echo alive") == "alive\n"
    # A new lifetime counts from now: shorten it and the reaper follows the new one.
    extended_pid = api.qemu_pid(extended["vm_id"])
    patched = api.http.patch(f"/v1/vms/{extended['vm_id']}", json={"vm_lifetime_seconds": 1})
    new_expiry = parse_time(patched.json()["expires_at"])
    record = api.wait_for(extended["vm_id"], {"terminating", "terminated", "failed"}, 30)
    assert record["status"] in ("terminating", "terminated")
    assert time.time() > new_expiry - 0.5
    assert api.wait_for(extended["vm_id"], {"terminated"}, 10)["status"] == "terminated"
    assert_gone(api, extended["vm_id"], extended_pid)
    # An ended VM's lifetime cannot be changed.
    assert api.http.patch(
        f"/v1/vms/{extended['vm_id']}", json={"vm_lifetime_seconds": 60}
    ).status_code == 409


def test_delete_leaves_nothing_behind_and_is_idempotent(api: Api) -> None:
    started = time.monotonic()
    created = api.create_ok(**SMALL)
    create_ms = (time.monotonic() - started) * 1000
    vm_id = created["vm_id"]
    pid = api.qemu_pid(vm_id)
    assert process_exists(pid)
    assert api.run_dir(vm_id).is_dir()

    started = time.monotonic()
    deleted = api.delete(vm_id)
    delete_ms = (time.monotonic() - started) * 1000
    print(f"\ncreate (restore, wait=true) {create_ms:.0f} ms, delete {delete_ms:.0f} ms")
    assert deleted.status_code == 200
    assert deleted.json()["vm_id"] == vm_id and deleted.json()["status"] == "terminated"
    # Gone by the time DELETE answers, not eventually.
    assert not process_exists(pid)
    assert not api.run_dir(vm_id).exists()

    again = api.delete(vm_id)
    assert (again.status_code, again.json()) == (200, deleted.json())
    assert api.vm(vm_id)["status"] == "terminated"
    assert vm_id not in [vm["vm_id"] for vm in api.http.get("/v1/vms").json()]
    assert vm_id in [vm["vm_id"] for vm in api.http.get("/v1/vms/").json()]
    assert api.delete("vm-0000000000000000").status_code == 404


def test_a_qemu_killed_behind_the_servers_back_is_noticed(api: Api) -> None:
    created = api.create_ok(**SMALL)
    vm_id = created["vm_id"]
    pid = api.qemu_pid(vm_id)
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    record = api.wait_for(vm_id, {"failed"}, 30)
    noticed = time.monotonic() - killed_at
    print(f"\nthe watchdog noticed the dead QEMU after {noticed:.2f}s")
    assert record["status"] == "failed"
    assert noticed <= WATCHDOG_NOTICE_SECONDS
    assert "qemu process exited" in record["failure_reason"]
    assert_gone(api, vm_id, pid)
    assert api.http.post(
        "/execute", json={"session_id": created["session_id"], "command": "print(1)"}
    ).status_code == 409
    # Deleting a failed VM records that its user is done with it.
    assert api.delete(vm_id).json()["status"] == "terminated"


def test_console_tail_is_the_end_of_the_serial_log(api: Api) -> None:
    created = api.create_ok(**SMALL)
    vm_id = created["vm_id"]
    marker = f"kiln-console-marker-{uuid.uuid4().hex}"
    api.run(created["session_id"], f"echo early > /dev/ttyS0; echo {marker} > /dev/ttyS0")
    console_log = api.run_dir(vm_id) / "console.log"
    assert wait_until(lambda: marker.encode() in console_log.read_bytes(), 5)
    whole = console_log.read_bytes()

    tail = api.http.get(f"/v1/vms/{vm_id}/console", params={"tail_bytes": 200})
    assert tail.status_code == 200, tail.text
    assert tail.json()["vm_id"] == vm_id
    assert tail.json()["output"].encode() == whole[-200:]
    assert tail.json()["output"].rstrip().endswith(marker)
    short = api.http.get(f"/v1/vms/{vm_id}/console", params={"tail_bytes": 10}).json()
    assert short["output"].encode() == whole[-10:]
    everything = api.http.get(f"/v1/vms/{vm_id}/console").json()["output"]
    assert everything.encode() == whole[-64 * 1024 :]
    assert "early" in everything
    assert api.http.get(f"/v1/vms/{vm_id}/console", params={"tail_bytes": 0}).status_code == 422
    assert api.http.get("/v1/vms/vm-0000000000000000/console").status_code == 404
    assert api.delete(vm_id).status_code == 200


# ---- servers of their own -------------------------------------------------------------


def test_admission_limits_refuse_with_503_and_start_nothing(images: None) -> None:
    limits = {"KILN_MAX_VMS": "2", "KILN_MAX_MEMORY_MB": "768", "KILN_MAX_VCPUS": "3"}
    with live_server("kiln-admit-", env=limits) as api:
        first = api.create_ok(**SMALL)

        def refused(expected: str, **fields: object) -> None:
            before = sorted(path.name for path in api.settings.vms_dir.glob("*"))
            records = len(api.http.get("/v1/vms/").json())
            response = api.create(**fields)
            assert response.status_code == 503, response.text
            assert expected in response.json()["detail"]
            assert sorted(path.name for path in api.settings.vms_dir.glob("*")) == before
            assert len(api.http.get("/v1/vms/").json()) == records
            assert len(qemu_pids_under(api.server.data_dir)) == len(before)

        # 256 + 1000 MB > 768 (an odd size: no base snapshot of it exists to restore)
        refused("not enough memory", memory_mb=1000, vcpu_count=1)
        refused("not enough vCPUs", memory_mb=256, vcpu_count=3)  # 1 + 3 > 3
        second = api.create_ok(**SMALL)
        refused("limit of 2 VMs", **SMALL)
        # A refused create of a shape nobody has cached starts no cold boot either
        # (no base snapshot is made for it in the background).
        cache = Settings().cache_dir / "base-snapshots"
        assert not list(cache.glob("*-1000m-1c-*"))
        for build in cache.glob(".build-*/vm/machine.json"):
            assert json.loads(build.read_text())["memory_mb"] != 1000

        # Capacity comes back when a VM goes.
        assert api.delete(second["vm_id"]).status_code == 200
        third = api.create_ok(**SMALL)
        for created in (first, third):
            assert api.delete(created["vm_id"]).status_code == 200


def test_kill_9_restart_adopts_live_vms_and_fails_dead_ones(images: None) -> None:
    """The adopted VM answering after a SIGKILL restart is also covered (with
    execution tasks) by test_execution_tasks.py; this adds a VM whose QEMU dies
    while no server runs."""
    with live_server("kiln-restart-") as api:
        kept = api.create_ok(**SMALL)
        lost = api.create_ok(**SMALL)
        api.run(kept["session_id"], "echo before > /root/marker")
        lost_pid = api.qemu_pid(lost["vm_id"])
        kept_pid = api.qemu_pid(kept["vm_id"])

        api.server.stop(crash=True)
        os.kill(lost_pid, signal.SIGKILL)
        assert wait_until(lambda: not process_exists(lost_pid), 5)
        assert process_exists(kept_pid)

        restarted = start_server(api.server.data_dir, port=int(api.server.url.rsplit(":", 1)[1]))
        api.server = restarted
        adopted = api.vm(kept["vm_id"])
        assert adopted["status"] == "running"
        assert api.run(kept["session_id"], "cat /root/marker") == "before\n"
        assert api.qemu_pid(kept["vm_id"]) == kept_pid  # the same process, not a new VM

        failed = api.vm(lost["vm_id"])
        assert failed["status"] == "failed"
        assert "not running after server restart" in failed["failure_reason"]
        assert not api.run_dir(lost["vm_id"]).exists()
        for created in (kept, lost):
            assert api.delete(created["vm_id"]).status_code == 200
        assert_gone(api, kept["vm_id"], kept_pid)


def broken_cache(root: Path) -> Path:
    """A KILN_CACHE_DIR whose ``default`` image has a corrupt kernel and whose
    ``minimal`` image lacks its rootfs (a dangling symlink): real image dirs as
    the image store finds them, broken the way a bad disk or a bad copy breaks them."""
    real = ImageStore(Settings())
    images = root / "images"
    images.mkdir(parents=True)
    for variant in ("default", "minimal"):
        source = real.get(variant)
        assert source is not None
        broken = images / f"{variant}-broken"
        broken.mkdir()
        shutil.copyfile(source.kernel.parent / "build.json", broken / "build.json")
        for name, path in (("vmlinuz", source.kernel), ("initrd.img", source.initrd),
                           ("rootfs.ext4", source.rootfs)):  # fmt: skip
            (broken / name).symlink_to(path)
        (images / f"{variant}.current").symlink_to(broken.name)
    kernel = images / "default-broken" / "vmlinuz"
    kernel.unlink()
    kernel.write_bytes(b"this is not a kernel\n" * 4096)
    rootfs = images / "minimal-broken" / "rootfs.ext4"
    rootfs.unlink()
    rootfs.symlink_to(root / "no-such-rootfs.ext4")
    return root


def test_a_broken_image_fails_cleanly(images: None) -> None:
    cache = broken_cache(short_data_dir("kiln-badcache-"))
    try:
        with live_server("kiln-badimg-", env={"KILN_CACHE_DIR": str(cache)}) as api:
            for variant, reason in (("default", "kernel"), ("minimal", "rootfs")):
                response = api.create(image_variant=variant, **SMALL)
                assert response.status_code == 503, response.text
                records = [vm for vm in api.http.get("/v1/vms/").json()
                           if vm["image_variant"] == variant]  # fmt: skip
                assert len(records) == 1
                (record,) = records
                assert record["vm_id"] in response.json()["detail"]
                assert record["status"] == "failed"
                print(f"\n{variant}: {record['failure_reason'][:300]}")
                assert reason in record["failure_reason"].lower(), record["failure_reason"]
                # No process, overlay, socket or run dir.
                assert not api.run_dir(record["vm_id"]).exists()
                assert qemu_pids_under(api.server.data_dir) == []
                assert api.delete(record["vm_id"]).json()["status"] == "terminated"

                # wait=false: creating at first, then failed the same way.
                pending = api.create_ok(wait=False, image_variant=variant, **SMALL)
                assert pending["status"] == "creating"
                record = api.wait_for(pending["vm_id"], {"failed", "running"}, 60)
                assert record["status"] == "failed" and record["failure_reason"]
                assert not api.run_dir(pending["vm_id"]).exists()
                assert api.delete(pending["vm_id"]).status_code == 200
            # Nothing of a background base snapshot build of the broken images runs on.
            assert wait_until(lambda: qemu_pids_under(cache) == [], 30)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
