"""Size limits, whole uploads, streamed downloads and a log without secrets, against
a real ``kiln serve`` (small limits, debug logging) with one real VM.

The server runs at ``KILN_LOG_LEVEL=debug`` for the whole module; the last test
reads its entire log (stdout and stderr) and looks for every secret the module
used: a password, API keys (in headers, as bearer tokens, in the PTY
WebSocket's ``?api_key=``, one made through the API, one unknown), bearer
tokens. Users and keys are made with the real CLI, as an operator would.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import time
from collections.abc import Iterator

import httpx
import pytest
import websockets
from instavm import InstaVM
from live_server import LiveServer, cli, serving

pytestmark = pytest.mark.vm

MAX_REQUEST_BYTES = 64 * 1024
MAX_UPLOAD_BYTES = 1024 * 1024
MAX_DOWNLOAD_BYTES = 3 * 1024 * 1024
SERVER_ENV = {
    "KILN_LOG_LEVEL": "debug",
    "KILN_MAX_REQUEST_BYTES": str(MAX_REQUEST_BYTES),
    "KILN_MAX_UPLOAD_BYTES": str(MAX_UPLOAD_BYTES),
    "KILN_MAX_DOWNLOAD_BYTES": str(MAX_DOWNLOAD_BYTES),
}
USERNAME = "carol"
PASSWORD = "pw-" + secrets.token_urlsafe(18)
# Every secret the module sends; none may be in the server's log.
SECRETS_USED: dict[str, str] = {"password": PASSWORD}


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with serving("kiln-hard-", env=SERVER_ENV, users=user_keys) as live:
        yield live


def user_keys() -> list[str]:
    """The user's key once ``user_key`` made it (for the teardown: that user's VMs go too)."""
    return [value for name, value in SECRETS_USED.items() if name == "user key"]


@pytest.fixture(scope="module")
def user_key(server: LiveServer) -> str:
    cli(server, "users", "create", USERNAME, "--password-stdin", stdin=PASSWORD + "\n")
    key = cli(server, "keys", "create", "--user", USERNAME).strip().splitlines()[-1]
    SECRETS_USED["user key"] = key
    return key


@pytest.fixture(scope="module")
def client(server: LiveServer, user_key: str) -> InstaVM:
    return InstaVM(api_key=user_key, base_url=server.url, timeout=900, cpu_count=1, memory_mb=256)


@pytest.fixture
def http(server: LiveServer, user_key: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers={"X-API-Key": user_key}, timeout=120) as client:
        yield client


def shell(client: InstaVM, command: str) -> str:
    result = client.execute(command, language="bash")
    assert result["exit_code"] == 0, result
    return str(result["stdout"])


def chunks_of(data: bytes, size: int = 16 * 1024) -> Iterator[bytes]:
    """A body sent chunked (no Content-Length)."""
    for start in range(0, len(data), size):
        yield data[start : start + size]


# -- request bodies -------------------------------------------------------------------


def test_a_body_over_the_limit_is_413_declared_or_chunked(client: InstaVM, http: httpx.Client) -> None:
    code = "x = 1  # " + "y" * MAX_REQUEST_BYTES
    body = f'{{"command": "{code}", "session_id": "{client.session_id}"}}'.encode()
    declared = http.post("/execute", content=body, headers={"Content-Type": "application/json"})
    chunked = http.post("/execute", content=chunks_of(body), headers={"Content-Type": "application/json"})
    for answer in (declared, chunked):
        assert answer.status_code == 413, answer.text
        assert f"larger than this server accepts ({MAX_REQUEST_BYTES} bytes)" in answer.json()["detail"]
    assert "content-length" not in chunked.request.headers
    # The same route with a body under the limit, on the same connections.
    assert client.execute("print('fine')")["stdout"] == "fine\n"


# -- uploads ---------------------------------------------------------------------------


def multipart(session_id: str, remote_path: str, data: bytes) -> tuple[bytes, str]:
    boundary = "kiln-test-" + secrets.token_hex(8)
    fields = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in (("remote_path", remote_path), ("session_id", session_id))
    )
    file_part = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="f"\r\n'
        f"Content-Type: application/octet-stream\r\n\r\n"
    ).encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return fields + file_part, f"multipart/form-data; boundary={boundary}"


def test_an_upload_over_the_limit_is_413_and_leaves_no_file(client: InstaVM, http: httpx.Client) -> None:
    shell(client, "mkdir -p /app/up && rm -rf /app/up/*  /app/up/.[!.]*")
    too_big = os.urandom(MAX_UPLOAD_BYTES + 1)
    declared = http.post(
        "/upload", files={"file": ("f", too_big)},
        data={"remote_path": "/app/up/big.bin", "session_id": client.session_id},
    )  # fmt: skip
    body, content_type = multipart(client.session_id, "/app/up/chunked.bin", os.urandom(2 * MAX_UPLOAD_BYTES))
    chunked = http.post("/upload", content=chunks_of(body), headers={"Content-Type": content_type})
    for answer in (declared, chunked):
        assert answer.status_code == 413, answer.text
        assert isinstance(answer.json()["detail"], str)
    assert shell(client, "ls -A /app/up") == ""
    # At the limit exactly: accepted, whole.
    data = os.urandom(MAX_UPLOAD_BYTES)
    fits = http.post(
        "/upload", files={"file": ("f", data)},
        data={"remote_path": "/app/up/fits.bin", "session_id": client.session_id},
    )  # fmt: skip
    assert fits.status_code == 200, fits.text
    assert shell(client, "sha256sum /app/up/fits.bin").split()[0] == hashlib.sha256(data).hexdigest()
    assert shell(client, "ls -A /app/up") == "fits.bin\n"


def test_an_upload_replaces_its_target_whole_and_keeps_its_mode(client: InstaVM, http: httpx.Client) -> None:
    shell(client, "mkdir -p /app/mode && printf old > /app/mode/conf && chmod 600 /app/mode/conf")
    answer = http.post(
        "/upload", files={"file": ("f", b"new content")},
        data={"remote_path": "/app/mode/conf", "session_id": client.session_id},
    )  # fmt: skip
    assert answer.status_code == 200, answer.text
    assert shell(client, "cat /app/mode/conf; echo; stat -c %a /app/mode/conf; ls -A /app/mode") == (
        "new content\n600\nconf\n"
    )


def test_an_upload_the_guest_cannot_finish_leaves_the_old_file_and_no_temporary(
    client: InstaVM, http: httpx.Client
) -> None:
    # A 600 KiB filesystem: the upload fails after a few chunks with "no space".
    # (The image has no mount(8): the system call, from Python.)
    mounted = client.execute(
        "import ctypes, os\n"
        "os.makedirs('/mnt/small', exist_ok=True)\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "assert libc.mount(b'tmpfs', b'/mnt/small', b'tmpfs', 0, b'size=600k') == 0, ctypes.get_errno()\n"
        "open('/mnt/small/f', 'w').write('old')"
    )
    assert mounted["exit_code"] == 0, mounted
    answer = http.post(
        "/upload", files={"file": ("f", os.urandom(900 * 1024))},
        data={"remote_path": "/mnt/small/f", "session_id": client.session_id},
    )  # fmt: skip
    # The guest's disk is full: 507, and the target is left as it was.
    assert answer.status_code == 507, answer.text
    assert "No space left" in answer.json()["detail"]
    assert shell(client, "ls -A /mnt/small; cat /mnt/small/f") == "f\nold"
    unmounted = client.execute("import ctypes\nassert ctypes.CDLL(None).umount2(b'/mnt/small', 2) == 0")
    assert unmounted["exit_code"] == 0, unmounted


# -- downloads -------------------------------------------------------------------------


def test_downloads_are_streamed_whole_and_stop_at_the_limit(client: InstaVM, http: httpx.Client) -> None:
    size = 2 * 1024 * 1024 + 1  # several agent chunks, not a multiple of 3
    shell(client, f"head -c {size} /dev/urandom > /app/dl.bin")
    shell(client, f"head -c {MAX_DOWNLOAD_BYTES + 1} /dev/zero > /app/huge.bin")
    guest_sum = shell(client, "sha256sum /app/dl.bin").split()[0]
    downloaded = client.download_file("/app/dl.bin")
    assert hashlib.sha256(downloaded["content"]).hexdigest() == guest_sum
    form = {"filename": "/app/dl.bin", "session_id": client.session_id}
    with http.stream("POST", "/download", data=form) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        assert "content-length" not in response.headers  # streamed, not built whole first
        pieces = sum(1 for _ in response.iter_raw())
        assert response.num_bytes_downloaded > size * 4 // 3
    print(f"\n{size} bytes arrived in {pieces} pieces")
    answer = http.post("/download", data={"filename": "/app/dl.bin", "session_id": client.session_id}).json()
    assert answer["size"] == size and answer["filename"] == "/app/dl.bin"
    huge = http.post("/download", data={"filename": "/app/huge.bin", "session_id": client.session_id})
    assert huge.status_code == 413 and str(MAX_DOWNLOAD_BYTES) in huge.json()["detail"]
    shell(client, ": > /app/empty")
    empty = http.post("/download", data={"filename": "/app/empty", "session_id": client.session_id})
    assert empty.json() == {"filename": "/app/empty", "content": "", "size": 0}


# -- the log ---------------------------------------------------------------------------


def test_no_secret_reaches_the_log_at_debug_level(
    server: LiveServer, client: InstaVM, http: httpx.Client, user_key: str
) -> None:
    url = server.url
    wrong = httpx.post(f"{url}/v1/auth/token", data={"username": USERNAME, "password": PASSWORD + "x"})
    assert wrong.status_code == 401
    SECRETS_USED["wrong password"] = PASSWORD + "x"
    login = httpx.post(f"{url}/v1/auth/token", data={"username": USERNAME, "password": PASSWORD})
    assert login.status_code == 200, login.text
    token = SECRETS_USED["token"] = login.json()["access_token"]
    for headers in ({"Authorization": f"Bearer {token}"}, {"X-API-Key": token},
                    {"Authorization": f"Bearer {user_key}"}):  # fmt: skip
        assert httpx.get(f"{url}/v1/users/me", headers=headers).json()["username"] == USERNAME
    unknown = SECRETS_USED["unknown key"] = "kiln_" + secrets.token_urlsafe(32)
    assert httpx.get(f"{url}/v1/vms", headers={"X-API-Key": unknown}).status_code == 401
    made = http.post("/v1/api-keys/", json={"name": "temporary"}).json()
    new_key = SECRETS_USED["key made through the API"] = made["key"]
    assert httpx.get(f"{url}/v1/users/me", headers={"X-API-Key": new_key}).status_code == 200

    # A terminal over the WebSocket, with the key in the query string, then a bearer header.
    pty_id = client.pty.create(client.session_id)["session_id"]
    ws_url = client.pty.ws_url(client.session_id, pty_id)
    assert "api_key=" in ws_url

    async def type_in_terminal() -> None:
        async with websockets.connect(ws_url) as socket:
            await socket.send(b"echo hi-from-pty\n")
            seen = b""
            while b"hi-from-pty\r\n" not in seen.replace(b"echo hi-from-pty", b""):
                message = await asyncio.wait_for(socket.recv(), 20)
                seen += message if isinstance(message, bytes) else message.encode()
        bare = ws_url.split("?", 1)[0]
        async with websockets.connect(bare, additional_headers={"Authorization": f"Bearer {token}"}) as socket:
            await socket.send(b"exit\n")
            with pytest.raises(websockets.ConnectionClosed):
                while True:
                    await asyncio.wait_for(socket.recv(), 20)

    asyncio.run(type_in_terminal())

    # Revoked with the CLI: the running server refuses the key within its cache's lifetime.
    listed = cli(server, "keys", "ls", "--user", USERNAME)
    assert new_key not in listed
    cli(server, "keys", "revoke", str(made["id"]))
    deadline = time.monotonic() + 60
    while httpx.get(f"{url}/v1/users/me", headers={"X-API-Key": new_key}).status_code != 401:
        assert time.monotonic() < deadline, "a revoked key kept working"
        time.sleep(0.5)

    log = server.log_path.read_text(errors="replace")
    assert "DEBUG" in log and "/connect" in log  # the debug log was on and saw the WebSocket
    assert "api_key=<redacted>" in log  # uvicorn's access log printed the query string, redacted
    leaked = [name for name, value in SECRETS_USED.items() if value in log]
    assert leaked == [], f"secrets in the server's log: {leaked}"
    # The admin's key is printed once at the first start (CONTRACT.md), and never logged.
    assert log.count(server.admin_key) == 1
