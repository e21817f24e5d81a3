"""Shares through a real ``kiln serve`` and its share router, to real VMs.

One server (its own share port) and one VM running ``guest_web_app.py``
serve the module; the tests share them in order: public shares (HTTP, a
streamed 50 MB body each way, a WebSocket echo), private shares (who is
refused, who admitted, and that Kiln's credentials never reach the guest),
revoked, deleted and closed-port shares, the router outliving a server
restart, and last an auto-suspended VM that a share request wakes. The
server's cleanup checks nothing is left (QEMU, run dirs, namespaces); the
router is stopped with it and must be gone.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator

import aiohttp
import httpx
import pytest
from live_api import DEFAULTS, SMALL, Api, live_server, process_exists, wait_until
from live_server import ensure_default_image, free_port, start_server
from share_fixtures import APP_PORT, host_of, pattern_bytes, pattern_digest, start_app
from unit.harness import add_user

from kiln.router.supervisor import RouterSupervisor

pytestmark = pytest.mark.vm

FIFTY_MB = 50 * 1024 * 1024
IDLE_SECONDS = 4


@pytest.fixture(scope="module")
def share_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def api(share_port: int) -> Iterator[Api]:
    env = {"KILN_SHARE_HTTP_PORT": str(share_port), "KILN_AUTO_SUSPEND_IDLE_SECONDS": str(IDLE_SECONDS)}
    ensure_default_image(DEFAULTS)
    with live_server("kiln-shr-", env=env) as live:
        yield live
        router_pid = RouterSupervisor(live.settings).pid()
    # live_server's exit stopped the router with the rest of the server's leftovers.
    assert router_pid is not None and wait_until(lambda: not process_exists(router_pid), 10), "the router was left"


@pytest.fixture(scope="module")
def vm(api: Api) -> dict:
    created = api.create_ok(**SMALL, vm_lifetime_seconds=1800)
    start_app(api, created["session_id"])
    return created


@pytest.fixture(scope="module")
def router(share_port: int) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"http://127.0.0.1:{share_port}", timeout=300) as client:
        yield client


@pytest.fixture(scope="module")
def other_user(api: Api) -> dict[str, str]:
    """Another user's API key and bearer token."""
    key = asyncio.run(add_user(api.settings, "someone-else", "their password"))
    token = api.http.post("/v1/auth/token", data={"username": "someone-else", "password": "their password"})
    return {"key": key, "token": token.json()["access_token"]}


def share(api: Api, vm: dict, port: int = APP_PORT, public: bool = True) -> dict:
    answer = api.http.post("/v1/shares", json={"vm_id": vm["vm_id"], "port": port, "is_public": public})
    assert answer.status_code == 200, answer.text
    return answer.json()


async def websocket_echo(share_port: int, host: str, headers: dict[str, str] | None = None) -> list[object]:
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(
            f"http://127.0.0.1:{share_port}/ws", headers={"Host": host, **(headers or {})}, protocols=["echo"]
        ) as socket:
            assert socket.protocol == "echo"
            await socket.send_str("hot reload?")
            text = (await socket.receive()).data
            await socket.send_bytes(bytes(range(256)) * 400)
            binary = (await socket.receive()).data
            return [text, binary == bytes(range(256)) * 400]


def test_a_public_share_serves_http_50_mb_each_way_and_a_websocket(
    api: Api, vm: dict, router: httpx.Client, share_port: int
) -> None:
    public = share(api, vm)
    host = {"Host": host_of(public)}
    hello = router.get("/hello", headers=host)
    assert (hello.status_code, hello.text) == (200, f"hello from {vm['vm_id']}")

    digest, size = hashlib.sha256(), 0
    with router.stream("GET", f"/bytes/{FIFTY_MB}", headers=host) as answer:
        assert answer.status_code == 200 and answer.headers.get("transfer-encoding") == "chunked"
        for chunk in answer.iter_raw():
            digest.update(chunk)
            size += len(chunk)
    assert (size, digest.hexdigest()) == (FIFTY_MB, pattern_digest(FIFTY_MB))

    uploaded = router.post("/sum", headers=host, content=pattern_bytes(FIFTY_MB))  # chunked: a generator
    assert uploaded.json() == {"sha256": pattern_digest(FIFTY_MB), "length": FIFTY_MB}
    sized = router.post("/sum", headers=host, content=b"x" * 1000)  # Content-Length
    assert sized.json() == {"sha256": hashlib.sha256(b"x" * 1000).hexdigest(), "length": 1000}

    assert asyncio.run(websocket_echo(share_port, host_of(public))) == ["hot reload?", True]
    # Another host name is no share at all.
    assert router.get("/hello", headers={"Host": "nothing.example"}).status_code == 404


def test_a_private_share_admits_its_owner_and_signed_links_only(
    api: Api, vm: dict, router: httpx.Client, share_port: int, other_user: dict[str, str]
) -> None:
    private = share(api, vm, public=False)
    host = host_of(private)
    owner_key = api.server.admin_key

    stranger = router.get("/hello", headers={"Host": host})
    assert stranger.status_code == 401 and "private" in stranger.text
    assert router.get("/hello", headers={"Host": host, "X-API-Key": other_user["key"]}).status_code == 404
    bearer = {"Authorization": f"Bearer {other_user['token']}"}
    assert router.get("/hello", headers={"Host": host, **bearer}).status_code == 404
    assert router.get("/hello", headers={"Host": host, "X-API-Key": "kiln_not-a-key"}).status_code == 401

    seen = router.get("/headers", headers={"Host": host, "X-API-Key": owner_key, "Cookie": "app=1"})
    assert seen.status_code == 200
    reached = {name.lower(): value for name, value in seen.json().items()}
    assert "x-api-key" not in reached and reached["cookie"] == "app=1" and reached["host"] == host

    link = api.http.post(f"/v1/shares/{private['share_id']}/link", json={"expires_in": 600}).json()
    path_and_query = link["url"].split(host, 1)[1]
    entered = router.get(path_and_query + "&x=1", headers={"Host": host})
    assert entered.status_code == 303 and entered.headers["location"] == "/?x=1"
    cookie = entered.headers["set-cookie"]
    assert "HttpOnly" in cookie and "Domain" not in cookie and "kiln_share=" in cookie
    jar = {"Cookie": cookie.split(";", 1)[0] + "; app=2"}
    with_cookie = router.get("/headers", headers={"Host": host, **jar})
    assert with_cookie.status_code == 200
    reached = {name.lower(): value for name, value in with_cookie.json().items()}
    assert reached["cookie"] == "app=2" and "kiln_share_token" not in with_cookie.text
    assert asyncio.run(websocket_echo(share_port, host, jar)) == ["hot reload?", True]
    # The cookie is the share's: another share's host does not take it.
    other = share(api, vm, public=False)
    assert router.get("/hello", headers={"Host": host_of(other), **jar}).status_code == 401
    assert owner_key not in (api.settings.router_state_dir / "router.log").read_text()


def test_revoked_and_deleted_shares_are_404_and_a_closed_port_502(
    api: Api, vm: dict, router: httpx.Client
) -> None:
    revoked = share(api, vm)
    assert router.get("/hello", headers={"Host": host_of(revoked)}).status_code == 200
    api.http.patch(f"/v1/shares/{revoked['share_id']}", json={"revoke": True})
    gone = router.get("/hello", headers={"Host": host_of(revoked)})
    assert gone.status_code == 404 and "revoked" in gone.text
    deleted = share(api, vm)
    api.http.delete(f"/v1/shares/{deleted['share_id']}")
    assert router.get("/hello", headers={"Host": host_of(deleted)}).status_code == 404

    closed = router.get("/", headers={"Host": host_of(share(api, vm, port=9))})
    assert closed.status_code == 502 and "Nothing is listening on port 9" in closed.text


def test_the_router_outlives_a_server_restart(api: Api, vm: dict, router: httpx.Client) -> None:
    public = share(api, vm)
    pid = RouterSupervisor(api.settings).pid()
    api.server.stop()
    # No server: the router still serves the running VM.
    assert router.get("/hello", headers={"Host": host_of(public)}).status_code == 200
    env = {"KILN_SHARE_HTTP_PORT": str(router.base_url.port), "KILN_AUTO_SUSPEND_IDLE_SECONDS": str(IDLE_SECONDS)}
    api.connect(start_server(api.server.data_dir, env=env))
    assert RouterSupervisor(api.settings).pid() == pid  # adopted, not replaced
    after = router.get("/hello", headers={"Host": host_of(public)})
    assert after.status_code == 200, (after.text[-300:], api.vm(vm["vm_id"])["failure_reason"])


def test_an_auto_suspended_vm_wakes_on_a_share_request(api: Api, vm: dict, router: httpx.Client) -> None:
    public = share(api, vm)
    patched = api.http.patch(f"/v1/vms/{vm['vm_id']}", json={"auto_suspend": True, "auto_resume": True})
    assert patched.status_code == 200 and patched.json()["auto_suspend"] is True
    # Idle (no exec, no terminal, no share traffic) for IDLE_SECONDS: suspended.
    assert api.wait_for(vm["vm_id"], {"suspended"}, 120)["status"] == "suspended"
    woken = router.get("/hello", headers={"Host": host_of(public)})
    assert (woken.status_code, woken.text) == (200, f"hello from {vm['vm_id']}")
    assert api.vm(vm["vm_id"])["status"] == "running"
    api.http.patch(f"/v1/vms/{vm['vm_id']}", json={"auto_suspend": False})
