"""The official instavm SDK, unmodified, against a real Kiln server with real VMs.

One ``kiln serve`` subprocess (temp data dir, free port) serves the module. Two
VMs boot: the shared session most tests use, and one the kill test starts and
kills. Every VM is terminated at the end through the API, and any process left
despite that is destroyed from its run dir.

Where the SDK hides status codes (it wraps HTTP errors into its own
exceptions), the bad-input tests use httpx on the same routes.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import requests
import websockets
from instavm import InstaVM
from instavm.exceptions import ExecutionError, InstaVMError
from live_server import KILN, LiveServer, server_settings, serving
from unit.harness import add_user

pytestmark = pytest.mark.vm

# Small guests boot faster under TCG; everything here fits in them.
VM_MEMORY_MB = 256
VM_VCPUS = 1
SESSION_LIFETIME_SECONDS = 900


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with serving("kiln-sdk-", after_stop=the_admin_key_is_logged_once) as live:
        yield live


def the_admin_key_is_logged_once(live: LiveServer) -> None:
    # The key went in headers and in the PTY WebSocket's ?api_key= all along:
    # it is in the log once, where the first start printed it (CONTRACT.md).
    log = live.log_path.read_text(errors="replace")
    assert log.count(live.admin_key) == 1, "the admin's API key reached the server's log"


@pytest.fixture(scope="module")
def other_key(server: LiveServer) -> str:
    """The API key of a second user (who never starts a VM)."""
    return asyncio.run(add_user(server_settings(server.data_dir), "other-user"))


def new_client(server: LiveServer, **options: object) -> InstaVM:
    return InstaVM(
        api_key=server.admin_key,
        base_url=server.url,
        timeout=SESSION_LIFETIME_SECONDS,
        cpu_count=VM_VCPUS,
        memory_mb=VM_MEMORY_MB,
        **options,
    )


@pytest.fixture(scope="module")
def client(server: LiveServer) -> InstaVM:
    """The module's shared session (its VM is terminated by ``server``'s teardown)."""
    return new_client(server, metadata={"suite": "sdk-e2e"})


@pytest.fixture
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=server.url, headers={"X-API-Key": server.admin_key}, timeout=60
    ) as http_client:
        yield http_client


# -- sessions ----------------------------------------------------------------------------


def test_a_session_runs_a_vm_and_reports_on_it(client: InstaVM) -> None:
    assert client.session_id
    status = client.get_session_status()
    assert status["vm_status"] == "active"
    assert client.is_session_active()
    info = client.get_session_info()
    assert info["session_id"] == client.session_id
    assert info["vm_id"] == status["vm_id"]
    assert (info["memory_mb"], info["vcpu_count"]) == (VM_MEMORY_MB, VM_VCPUS)
    usage = client.get_usage()
    assert usage["cpu_seconds"] > 0
    assert usage["memory_mb"] == VM_MEMORY_MB
    assert usage["uptime_seconds"] > 0
    listed = client.list_sandboxes(metadata={"suite": "sdk-e2e"})
    assert [record["session_id"] for record in listed] == [client.session_id]
    assert client.list_sandboxes(metadata={"suite": "no such suite"}) == []


# -- execution -------------------------------------------------------------------------


def test_python_state_persists_between_calls(client: InstaVM) -> None:
    assert client.execute("x = 41")["exit_code"] == 0
    result = client.execute("print(x + 1)")
    assert result["stdout"] == "42\n"
    assert result["exit_code"] == 0
    assert result["execution_time"] >= 0 and result["cpu_time"] >= 0


def test_bash_runs_in_app_with_its_exit_code_and_stderr(client: InstaVM) -> None:
    result = client.execute("pwd; echo oops >&2; exit 3", language="bash")
    assert result["stdout"] == "/app\n"
    assert result["stderr"] == "oops\n"
    assert result["exit_code"] == 3


def test_an_exception_returns_its_traceback_and_the_interpreter_stays_usable(
    client: InstaVM,
) -> None:
    client.execute("kept = 'still here'")
    failed = client.execute("def boom():\n    raise ValueError('bad value')\nboom()")
    assert failed["exit_code"] != 0
    assert "Traceback" in failed["stderr"]
    assert "ValueError: bad value" in failed["stderr"]
    assert "boom()" in failed["stderr"]
    assert client.execute("print(kept)")["stdout"] == "still here\n"


def test_a_timeout_stops_the_run_and_keeps_the_output_so_far(client: InstaVM) -> None:
    started = time.monotonic()
    # The SDK uses the same timeout for its HTTP request: the answer must beat it.
    result = client.execute(
        "import time\nprint('before', flush=True)\ntime.sleep(60)\nprint('after')", timeout=4
    )
    assert time.monotonic() - started < 4
    assert result["stdout"] == "before\n"
    assert "time limit of 4 s" in result["stderr"]
    assert result["timed_out"] is True
    bash = client.execute("echo started; sleep 60", language="bash", timeout=3)
    assert bash["stdout"] == "started\n" and bash["timed_out"] is True
    # The session works afterwards (a timed-out interpreter is replaced).
    assert client.execute("print('alive')")["stdout"] == "alive\n"


def test_ten_megabytes_of_output_are_capped_and_stall_nothing(client: InstaVM) -> None:
    started = time.monotonic()
    result = client.execute("head -c 10000000 /dev/zero | tr '\\0' a; echo done >&2", language="bash")
    elapsed = time.monotonic() - started
    print(f"\n10 MB of output: answered in {elapsed:.2f} s")
    marker = "\n[kiln: output truncated after 1048576 bytes]"
    assert result["stdout"] == "a" * 1048576 + marker
    assert result["exit_code"] == 0 and result["truncated"] is True
    # Python's own output goes the same way.
    python = client.execute("print('b' * 10_000_000)")
    assert python["stdout"].startswith("b" * 1000) and python["stdout"].endswith(marker)
    assert client.execute("echo next", language="bash")["stdout"] == "next\n"


def test_async_execution_is_fetched_by_task_id(client: InstaVM, http: httpx.Client) -> None:
    task = client.execute_async("import time; time.sleep(1); print('async done')")
    assert task["status"] == "running"
    result = client.get_task_result(task["task_id"], poll_interval=0.2, timeout=60)
    assert result["stdout"] == "async done\n"
    record = http.get(f"/v1/executions/{task['task_id']}").json()
    assert record["is_complete"] is True and record["exit_code"] == 0
    assert record["serialized_stdout"] == "async done\n"


# -- files ------------------------------------------------------------------------------


def test_a_5_mb_binary_round_trips_with_equal_sha256(client: InstaVM, tmp_path: Path) -> None:
    data = os.urandom(5 * 1024 * 1024)
    source = tmp_path / "blob.bin"
    source.write_bytes(data)
    started = time.monotonic()
    uploaded = client.upload_file(str(source), "/app/blob.bin")
    upload_seconds = time.monotonic() - started
    assert uploaded == {"success": True, "path": "/app/blob.bin", "size": len(data)}
    guest_sum = client.execute("sha256sum /app/blob.bin", language="bash")["stdout"].split()[0]
    assert guest_sum == hashlib.sha256(data).hexdigest()
    started = time.monotonic()
    downloaded = client.download_file("blob.bin")  # relative: in /app
    download_seconds = time.monotonic() - started
    print(f"\n5 MiB: upload {upload_seconds:.2f} s, download {download_seconds:.2f} s")
    assert hashlib.sha256(downloaded["content"]).digest() == hashlib.sha256(data).digest()
    target = tmp_path / "back.bin"
    client.download_file("/app/blob.bin", local_path=str(target))
    assert target.read_bytes() == data


def test_a_recursive_upload_unpacks_a_tar_archive(client: InstaVM, tmp_path: Path) -> None:
    archive = tmp_path / "tree.tar"
    with tarfile.open(archive, "w") as tar:
        for name, text in {"top.txt": "top\n", "sub/dir/deep.txt": "deep\n"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(text)
            tar.addfile(info, io.BytesIO(text.encode()))
    result = client.upload_file(str(archive), "/app/tree", recursive=True)
    assert result["success"] is True and result["path"] == "/app/tree"
    listing = client.execute("cd /app/tree && cat top.txt sub/dir/deep.txt", language="bash")
    assert listing["stdout"] == "top\ndeep\n"


# -- volumes ----------------------------------------------------------------------------


def test_volumes_through_the_sdk(client: InstaVM, tmp_path: Path) -> None:
    """Every call of ``VolumesManager`` and the VM mount calls, unmodified."""
    volume = client.volumes.create(name="sdk-data", quota_bytes=64 * 2**20)
    volume_id = volume["id"]
    try:
        assert (volume["name"], volume["quota_bytes"], volume["status"]) == ("sdk-data", 64 * 2**20, "ready")
        assert volume_id in [v["id"] for v in client.volumes.list()]
        assert client.volumes.update(volume_id, name="sdk-renamed")["name"] == "sdk-renamed"
        data = os.urandom(300_000)
        source = tmp_path / "in.bin"
        source.write_bytes(data)
        # Unmounted: a helper VM does the file work.
        assert client.volumes.upload_file(volume_id, str(source), "dir/in.bin")["size"] == len(data)
        assert [f["path"] for f in client.volumes.list_files(volume_id, prefix="dir/")] == ["dir/in.bin"]
        target = tmp_path / "out.bin"
        downloaded = client.volumes.download_file(volume_id, "dir/in.bin", local_path=str(target))
        assert downloaded["saved_bytes"] == len(data) and target.read_bytes() == data
        checkpoint = client.volumes.create_checkpoint(volume_id, name="first")
        assert [c["id"] for c in client.volumes.list_checkpoints(volume_id)] == [checkpoint["id"]]

        vm_id = client.get_session_status()["vm_id"]
        mounted = client.vms.mount_volume(vm_id, volume_id, "/data")
        assert (mounted["mount_path"], mounted["mode"], mounted["status"]) == ("/data", "rw", "mounted")
        assert [m["volume_id"] for m in client.vms.list_volumes(vm_id)] == [volume_id]
        guest = client.execute("sha256sum /data/dir/in.bin; echo more > /data/more", language="bash")
        assert guest["stdout"].split()[0] == hashlib.sha256(data).hexdigest()
        assert client.volumes.get(volume_id, refresh_usage=True)["used_bytes"] >= len(data)
        with pytest.raises(requests.HTTPError) as busy:
            client.volumes.delete(volume_id)
        assert busy.value.response.status_code == 409
        # Mounted: the files API goes through the VM itself.
        assert client.volumes.download_file(volume_id, "more")["size"] == len("more\n")
        assert client.vms.unmount_volume(vm_id, volume_id, "/data") == {"success": True}
        assert client.vms.list_volumes(vm_id) == []
        assert client.volumes.delete_file(volume_id, "more") == {"success": True}
        assert client.volumes.delete_checkpoint(volume_id, checkpoint["id"]) == {"success": True}
    finally:
        assert client.volumes.delete(volume_id) == {"success": True}
    assert volume_id not in [v["id"] for v in client.volumes.list()]


# -- terminals and streams ---------------------------------------------------------------


def test_a_pty_round_trip_over_the_websocket(client: InstaVM) -> None:
    sid = client.session_id
    pty = client.pty.create(sid, cols=100, rows=30)
    pty_id = pty["session_id"]
    assert any(entry["session_id"] == pty_id for entry in client.pty.list(sid))
    client.pty.resize(sid, pty_id, cols=120, rows=40)

    async def type_and_read() -> bytes:
        async with websockets.connect(client.pty.ws_url(sid, pty_id)) as socket:
            await socket.send(b"echo hi\n")
            seen = b""
            # Twice: once in the terminal's echo of "echo hi", once as the output.
            while seen.count(b"hi\r\n") < 2:
                message = await asyncio.wait_for(socket.recv(), 20)
                seen += message if isinstance(message, bytes) else message.encode()
            await socket.send("stty size\n")  # a text frame is input too
            while b"40 120" not in seen:
                message = await asyncio.wait_for(socket.recv(), 20)
                seen += message if isinstance(message, bytes) else message.encode()
            return seen

    assert b"40 120" in asyncio.run(type_and_read())
    assert client.pty.get(sid, pty_id)["alive"] is True
    killed = client.pty.kill(sid, pty_id)
    assert killed["success"] is True
    assert all(entry["session_id"] != pty_id for entry in client.pty.list(sid))


def read_events(response: httpx.Response) -> list[tuple[float, str, object]]:
    """(seconds since the first byte, event, decoded data) of an SSE answer."""
    events: list[tuple[float, str, object]] = []
    started = time.monotonic()
    event = "message"
    for line in response.iter_lines():
        if line.startswith("event: "):
            event = line.removeprefix("event: ")
        elif line.startswith("data: "):
            events.append((time.monotonic() - started, event, json.loads(line[6:])))
    return events


def test_execution_streams_as_server_sent_events(client: InstaVM, http: httpx.Client) -> None:
    command = "for i in 1 2 3; do echo line$i; sleep 0.5; done; echo warn >&2; exit 5"
    with http.stream(
        "POST",
        f"/v1/sessions/{client.session_id}/execute/stream",
        json={"command": command, "language": "bash"},
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = read_events(response)
    stdout = [(at, data) for at, kind, data in events if kind == "stdout"]
    assert "".join(str(data) for _, data in stdout) == "line1\nline2\nline3\n"
    # Streamed: the first line arrived well before the last.
    assert stdout[-1][0] - stdout[0][0] > 0.7
    assert [data for _, kind, data in events if kind == "stderr"] == ["warn\n"]
    assert events[-1][1] == "exit" and events[-1][2]["exit_code"] == 5  # type: ignore[index]


def test_the_cli_streams_vm_exec_and_exits_with_the_code(
    client: InstaVM, server: LiveServer
) -> None:
    vm_id = client.get_session_status()["vm_id"]
    env = {**os.environ, "KILN_URL": server.url, "KILN_API_KEY": server.admin_key}
    done = subprocess.run(
        [str(KILN), "vm", "exec", vm_id, "--", "echo out; echo err >&2; exit 7"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert (done.stdout, done.stderr, done.returncode) == ("out\n", "err\n", 7)
    words = subprocess.run(
        [str(KILN), "vm", "exec", vm_id, "--", "printf", "%s|", "a b", "c"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert words.stdout == "a b|c|"


# -- kill ---------------------------------------------------------------------------------


def test_kill_terminates_the_sessions_vm(server: LiveServer, http: httpx.Client) -> None:
    doomed = new_client(server)
    sid = doomed.session_id
    vm_id = doomed.get_session_status()["vm_id"]
    assert doomed.kill() == {"success": True, "vm_id": vm_id}
    assert http.get(f"/v1/vms/{vm_id}").json()["status"] == "terminated"
    status = http.get(f"/v1/sessions/status/{sid}").json()
    # The session exists and had a VM, which is no longer alive (the SDK's
    # integrations then start a new one).
    assert status == {
        "session_id": sid, "vm_id": vm_id, "vm_status": "terminated",
        "exists": True, "vm_assigned": True, "vm_alive": False,
    }  # fmt: skip
    # Killing again answers the same; running code in it is refused.
    assert http.post("/kill", json={"session_id": sid}).json() == {"success": True, "vm_id": vm_id}
    assert http.post("/execute", json={"command": "1", "session_id": sid}).status_code == 409


# -- bad input: 4xx, never 5xx ---------------------------------------------------------------


def test_an_unknown_session_is_404_everywhere(server: LiveServer, http: httpx.Client) -> None:
    sid = "no-such-session"
    answers = [
        http.post("/execute", json={"command": "1", "session_id": sid}),
        http.post("/execute_async", json={"command": "1", "session_id": sid}),
        http.post("/upload", files={"file": ("f", b"x")}, data={"remote_path": "/app/f", "session_id": sid}),
        http.post("/download", data={"filename": "f", "session_id": sid}),
        http.get(f"/v1/sessions/status/{sid}"),
        http.get(f"/v1/sessions/session/{sid}"),
        http.get(f"/v1/sessions/usage/{sid}"),
        http.post("/kill", json={"session_id": sid}),
        http.post(f"/v1/sessions/{sid}/pty/sessions", json={}),
        http.post(f"/v1/sessions/{sid}/execute/stream", json={"command": "1"}),
        http.get("/v1/executions/no-such-task"),
    ]
    assert [answer.status_code for answer in answers] == [404] * len(answers)
    sdk = InstaVM(api_key=server.admin_key, base_url=server.url, auto_start_session=False)
    sdk.session_id = sid
    with pytest.raises(ExecutionError, match="404"):
        sdk.execute("print(1)")


def test_another_users_session_and_task_are_404(
    client: InstaVM, server: LiveServer, other_key: str
) -> None:
    task = client.execute_async("print('mine')")
    other = {"X-API-Key": other_key}
    sid = client.session_id
    with httpx.Client(base_url=server.url, headers=other, timeout=60) as http:
        answers = [
            http.post("/execute", json={"command": "print(1)", "session_id": sid}),
            http.post("/download", data={"filename": "/etc/hostname", "session_id": sid}),
            http.get(f"/v1/sessions/status/{sid}"),
            http.post("/kill", json={"session_id": sid}),
            http.get(f"/v1/executions/{task['task_id']}"),
            http.get(f"/v1/sessions/{sid}/pty/sessions"),
        ]
    assert [answer.status_code for answer in answers] == [404] * len(answers)
    assert client.is_session_active()


def test_file_errors_are_clear_4xx(client: InstaVM, http: httpx.Client) -> None:
    sid = client.session_id
    missing = http.post("/download", data={"filename": "/app/not-there", "session_id": sid})
    assert missing.status_code == 404 and "not-there" in missing.json()["detail"]
    directory = http.post("/download", data={"filename": "/app", "session_id": sid})
    assert directory.status_code == 409
    no_parent = http.post(
        "/upload",
        files={"file": ("f", b"x")},
        data={"remote_path": "/app/no/such/dir/f", "session_id": sid},
    )
    assert no_parent.status_code == 404 and "/app/no/such/dir" in no_parent.json()["detail"]
    onto_directory = http.post(
        "/upload", files={"file": ("f", b"x")}, data={"remote_path": "/app", "session_id": sid}
    )
    assert onto_directory.status_code == 409
    not_a_tar = http.post(
        "/upload",
        files={"file": ("f", b"not a tar archive")},
        data={"remote_path": "/app/untarred", "session_id": sid, "recursive": "true"},
    )
    assert not_a_tar.status_code == 400
    with pytest.raises(InstaVMError, match="404"):
        client.download_file("/app/not-there")


def test_malformed_requests_are_4xx(client: InstaVM, http: httpx.Client) -> None:
    sid = client.session_id
    broken_multipart = http.post(
        "/upload",
        content=b"--wrong\r\nnot multipart at all",
        headers={"Content-Type": "multipart/form-data; boundary=expected"},
    )
    no_file = http.post("/upload", data={"remote_path": "/app/f", "session_id": sid})
    bad_language = http.post("/execute", json={"command": "1", "session_id": sid, "language": "cobol"})
    bad_timeout = http.post("/execute", json={"command": "1", "session_id": sid, "timeout": -1})
    huge_terminal = http.post(f"/v1/sessions/{sid}/pty/sessions", json={"cols": 10**6})
    assert broken_multipart.status_code == 400
    assert [r.status_code for r in (no_file, bad_language, bad_timeout, huge_terminal)] == [422] * 4
    # Still working afterwards.
    assert client.execute("print('fine')")["stdout"] == "fine\n"


def test_credentials_are_required(client: InstaVM, server: LiveServer) -> None:
    sid = client.session_id
    bare = httpx.post(f"{server.url}/execute", json={"command": "1", "session_id": sid})
    assert bare.status_code == 401

    async def connect_without_key() -> int | None:
        url = f"{server.url.replace('http', 'ws')}/v1/sessions/{sid}/pty/x/connect"
        async with websockets.connect(url) as socket:
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await socket.recv()
            return closed.value.rcvd.code if closed.value.rcvd else None

    assert asyncio.run(connect_without_key()) == 4401


def test_app_urls_and_shares_through_the_sdk(client: InstaVM, server: LiveServer) -> None:
    app = client.get_session_app_url(port=8000)
    assert (app["port"], app["is_public"]) == (8000, False) and app["share_id"] in app["url"]
    # Asked again: the same share, not a new one.
    assert client.get_session_app_url(port=8000)["share_id"] == app["share_id"]
    shared = client.shares.create(port=8001, is_public=True)
    assert (shared["port"], shared["is_public"], shared["status"]) == (8001, True, "active")
    assert client.shares.update(shared["share_id"], is_public=False)["is_public"] is False
    assert client.shares.update(shared["share_id"], revoke=True)["status"] == "revoked"


def test_an_unknown_terminal_closes_the_websocket_with_4404(client: InstaVM) -> None:
    async def connect() -> int | None:
        async with websockets.connect(client.pty.ws_url(client.session_id, "nope")) as socket:
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await socket.recv()
            return closed.value.rcvd.code if closed.value.rcvd else None

    assert asyncio.run(connect()) == 4404
