"""A guest that misbehaves harms only itself: a frozen agent gets every route on
its VM a clear answer within the route's deadline; an agent replaced by a
flooder gets its VM failed while another user's VM keeps its exec latency and
the server its memory; a console written without end stays under its cap; a
guest that fills its disk gets "no space" inside while the host keeps its
floor, and a full data disk makes no request a 500. Each VM can be deleted."""

from __future__ import annotations

import asyncio
import shutil
import statistics
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from live_api import SMALL, Api, build_images, live_server, wait_until
from live_server import destroy_leftover_vms, server_settings, short_data_dir, start_server, terminate_live_vms
from unit.harness import add_user

from kiln.config import Settings
from kiln.runtime.qemu.console import CAP_BYTES

pytestmark = pytest.mark.vm

AGENT_DEADLINE = 3  # KILN_AGENT_DEADLINE_SECONDS for these servers
# Far above any deadline: only a route that never answers hits it.
HANG = 60.0


@pytest.fixture(scope="module")
def images() -> None:
    build_images(Settings())


@pytest.fixture
def api(images: None) -> Iterator[Api]:
    with live_server("kiln-hostile-", env={"KILN_AGENT_DEADLINE_SECONDS": str(AGENT_DEADLINE)}) as started:
        yield started


def freeze_agent(api: Api, session: str) -> None:
    """SIGSTOP the guest agent a moment after this exec (run by the agent) returned."""
    api.run(session, 'agent=$PPID; nohup sh -c "sleep 1; kill -STOP $agent" >/dev/null 2>&1 &')
    # Until the stop lands, calls may still be answered; wait it out in the guest's terms.
    deadline = 30
    for _ in range(deadline * 4):
        response = api.http.post(
            "/execute", json={"session_id": session, "command": "true", "language": "bash", "timeout": 1},
            timeout=HANG,
        )  # fmt: skip
        if response.status_code == 503:
            return
    pytest.fail("the agent never stopped answering")


def test_a_frozen_agent_gets_every_route_an_answer_and_the_vm_can_be_deleted(api: Api) -> None:
    vm = api.create_ok(**SMALL)
    vm_id, session = vm["vm_id"], vm["session_id"]
    freeze_agent(api, session)
    http = api.http

    def unavailable(response: httpx.Response) -> None:
        assert response.status_code == 503, response.text
        assert vm_id in response.json()["detail"]

    for language in ("bash", "python"):
        unavailable(http.post(
            "/execute", json={"session_id": session, "command": "echo hi", "language": language, "timeout": 2},
            timeout=HANG,
        ))  # fmt: skip
    unavailable(http.post("/upload", data={"remote_path": "/root/x", "session_id": session},
                          files={"file": ("x", b"payload")}, timeout=HANG))  # fmt: skip
    unavailable(http.post("/download", data={"filename": "/etc/hostname", "session_id": session}, timeout=HANG))
    unavailable(http.post(f"/v1/vms/{vm_id}/pty/sessions", json={}, timeout=HANG))
    unavailable(http.get(f"/v1/vms/{vm_id}/pty/sessions", timeout=HANG))
    streamed = http.post(f"/v1/vms/{vm_id}/execute/stream", json={"command": "echo hi", "timeout": 2}, timeout=HANG)
    assert streamed.status_code in (200, 503), streamed.text
    if streamed.status_code == 200:
        assert "error" in streamed.text  # the stream ends with the reason

    # Routes that need no agent keep working.
    assert http.get(f"/v1/vms/{vm_id}", timeout=HANG).json()["status"] == "running"
    assert http.get(f"/v1/sessions/usage/{session}", timeout=HANG).status_code == 200
    assert http.get(f"/v1/vms/{vm_id}/console", timeout=HANG).status_code == 200
    snapshot = http.post(f"/v1/vms/{vm_id}/snapshot", timeout=HANG)
    assert snapshot.status_code == 200 and snapshot.json()["status"] == "ready", snapshot.text

    deleted = http.delete(f"/v1/vms/{vm_id}", timeout=HANG)
    assert deleted.status_code == 200 and deleted.json()["status"] == "terminated", deleted.text


# ---- a flooding guest, a chatty console: the other user's VM and the server are unharmed

FLOODER = """\
import os
port = os.open("/dev/virtio-ports/kiln.agent", os.O_RDWR)
junk = os.urandom(1 << 16)
while True:
    os.write(port, junk)
"""


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def exec_seconds(api: Api, headers: dict[str, str], session: str, samples: int) -> list[float]:
    took = []
    for _ in range(samples):
        started = time.monotonic()
        response = api.http.post(
            "/execute", json={"session_id": session, "command": "echo ok", "language": "bash"},
            headers=headers, timeout=HANG,
        )  # fmt: skip
        assert response.status_code == 200 and response.json()["stdout"] == "ok\n", response.text
        took.append(time.monotonic() - started)
    return took


def test_a_flooding_agent_and_a_chatty_console_harm_only_their_own_vm(api: Api) -> None:
    other_key = asyncio.run(add_user(server_settings(api.server.data_dir), "bystander"))
    other_headers = {"X-API-Key": other_key}
    bystander = api.http.post("/v1/vms", json=SMALL, headers=other_headers, timeout=HANG).json()
    exec_seconds(api, other_headers, bystander["session_id"], 2)  # a fresh guest's first execs are slow
    normal = statistics.median(exec_seconds(api, other_headers, bystander["session_id"], 10))
    server_rss = rss_kb(api.server.process.pid)

    flooder = api.create_ok(**SMALL)
    chatty = api.create_ok(**SMALL)
    # The chatty one writes its console without end.
    api.run(chatty["session_id"], "nohup sh -c 'while :; do cat /usr/bin/bash > /dev/ttyS0; done' >/dev/null 2>&1 &")
    # The flooder replaces its agent: init respawns the new one, which floods the port.
    api.run(
        flooder["session_id"],
        f"rm -rf /opt/kiln/agent/__pycache__ && cat > /opt/kiln/agent/__main__.py <<'EOF'\n{FLOODER}EOF\n"
        'agent=$PPID; nohup sh -c "sleep 1; kill $agent" >/dev/null 2>&1 &',
    )
    failed = wait_until(lambda: api.vm(flooder["vm_id"])["status"] == "failed", 60)
    assert failed, api.vm(flooder["vm_id"])
    assert "broke the protocol" in (api.vm(flooder["vm_id"])["failure_reason"] or "")

    during = exec_seconds(api, other_headers, bystander["session_id"], 10)
    print(f"\nbystander exec: {normal * 1000:.0f} ms before, {statistics.median(during) * 1000:.0f} ms during")
    # The chatty VM burns a core under TCG; a small factor, with room for a loaded host.
    assert statistics.median(during) < max(5 * normal, normal + 1.0)
    console_log = api.run_dir(chatty["vm_id"]) / "console.log"
    sizes = []
    for _ in range(10):
        sizes.append(console_log.stat().st_size)
        time.sleep(1)
    assert max(sizes) <= 2 * CAP_BYTES, sizes  # cut every watchdog pass (2 s)
    assert rss_kb(api.server.process.pid) < server_rss + 64 * 1024
    for vm, headers in ((flooder, None), (chatty, None), (bystander, other_headers)):
        deleted = api.http.delete(f"/v1/vms/{vm['vm_id']}", headers=headers, timeout=HANG)
        assert deleted.status_code == 200, deleted.text


# ---- a guest that fills its disk, with the data dir on a small file system


@pytest.fixture
def small_data_dir() -> Iterator[Path]:
    """A data dir on its own 3 GiB ext4 file system (a loop device over a sparse
    file; not tmpfs, whose pages would count as the writer's memory)."""
    directory = short_data_dir("kiln-smalldisk-")
    backing = directory.with_name(directory.name + ".img")
    subprocess.run(["truncate", "-s", "3G", str(backing)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-m", "0", str(backing)], check=True)
    subprocess.run(["mount", "-o", "loop", str(backing), str(directory)], check=True)
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)
        shutil.rmtree(directory, ignore_errors=True)
        backing.unlink(missing_ok=True)


def test_a_guest_filling_its_disk_gets_no_space_and_a_full_data_disk_is_never_a_500(
    images: None, small_data_dir: Path
) -> None:
    server = start_server(small_data_dir)
    api = Api(server)
    filler = small_data_dir / "host-filler"
    try:
        vm = api.create_ok(**SMALL)
        session = vm["session_id"]
        filled = api.http.post(
            "/execute",
            json={"session_id": session, "language": "bash", "command": "dd if=/dev/zero of=/root/big bs=1M"},
            timeout=HANG * 10,
        )
        assert filled.status_code == 200, filled.text
        result = filled.json()
        assert result["exit_code"] != 0 and "No space left on device" in result["stderr"], result
        # The host kept its floor: every route answers.
        assert api.vm(vm["vm_id"])["status"] == "running"
        assert api.run(session, "echo still here").strip() == "still here"

        # Now the host's disk fills behind Kiln's back (another program).
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=1M"], capture_output=True, check=False)
        answers = [
            api.http.get(f"/v1/vms/{vm['vm_id']}"),
            api.http.patch(f"/v1/vms/{vm['vm_id']}", json={"metadata": {"k": "v" * 4000}}),
            api.http.post(f"/v1/vms/{vm['vm_id']}/snapshot"),
            api.create(**SMALL),
            api.http.post("/execute", json={"session_id": session, "command": "echo x > /root/y", "language": "bash"}),
        ]
        for response in answers:
            assert response.status_code < 500 or response.status_code in (503, 507), (
                response.request.method, response.request.url, response.status_code, response.text,
            )  # fmt: skip
        assert answers[2].status_code == 507 and answers[3].status_code == 503, [a.text for a in answers]
        filler.unlink()
        assert api.delete(vm["vm_id"]).status_code == 200
    finally:
        filler.unlink(missing_ok=True)
        terminate_live_vms(server.url, [server.admin_key])
        api.http.close()
        server.stop()
        left = destroy_leftover_vms(server_settings(small_data_dir))
        server.log_path.unlink(missing_ok=True)
        assert not left, left
