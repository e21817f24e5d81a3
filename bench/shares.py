"""The share phase: the router against the guest's port straight from the host, same run.

One VM runs ``guest_web_app.py``. Plain requests (``GET /hello``, one client,
sequential, keep-alive) go once straight to the VM's outside address and port
(the host's own route: the baseline) and once through the router by Host
header; a WebSocket echo round trip goes through the router; and the VM,
suspended, is woken by a request whose first byte is timed.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import httpx

from bench.stats import Figures
from kiln.config import Settings
from kiln.net.participant import LEASE
from kiln.store.db import Database
from kiln.store.shares import ShareRepository

APP = Path(__file__).with_name("guest_web_app.py")
APP_PORT = 8000
READY_SECONDS = 60.0


def declare(figures: Figures) -> None:
    ms = "ms"
    figures.declare("share_direct_rps", "requests/s", note="GET /hello of the guest app straight to the VM's "
                    "outside address from the host, one keep-alive client, sequential")
    figures.declare("share_rps", "requests/s", baseline="share_direct_rps",
                    note="the same through the share router (Host header), public share")
    figures.declare("share_direct_ms", ms, note="latency of each of those direct requests")
    figures.declare("share_ms", ms, baseline="share_direct_ms", note="latency of each request through the router")
    figures.declare("share_ws_rtt_ms", ms, note="WebSocket echo round trip (16 bytes) through the router")
    figures.declare("share_wake_first_byte_ms", ms, note="GET through the router to a suspended VM with "
                    "auto_resume until the first byte of the answer (the router asks the server to resume it)")


def start_app(client: httpx.Client, session_id: str) -> None:
    encoded = base64.b64encode(APP.read_bytes()).decode()
    command = (
        f"python3 -c \"import base64,sys; open('/tmp/app.py','wb').write(base64.b64decode(sys.argv[1]))\" {encoded}"
        f" && (nohup python3 /tmp/app.py {APP_PORT} >/tmp/app.log 2>&1 &)"
    )
    client.post("/execute", json={"session_id": session_id, "command": command, "language": "bash"})
    probe = f"python3 -c \"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{APP_PORT}/hello')\""
    deadline = time.monotonic() + READY_SECONDS
    while time.monotonic() < deadline:
        answer = client.post("/execute", json={"session_id": session_id, "command": probe, "language": "bash"})
        if answer.json().get("exit_code") == 0:
            return
        time.sleep(0.2)
    raise RuntimeError("the guest app did not start")


def outside_address(settings: Settings, share_id: str) -> str:
    async def lookup() -> str | None:
        db = Database(settings.database, read_only=True)
        try:
            async with db.transaction() as session:
                route = await ShareRepository(session).route_any_owner(share_id, LEASE)
        finally:
            await db.close()
        return route.outside_address if route else None

    address = asyncio.run(lookup())
    if address is None:
        raise RuntimeError("the bench VM has no network (is guest networking on?)")
    return address


def timed_requests(client: httpx.Client, headers: dict[str, str], seconds: float) -> tuple[list[float], float]:
    """Latencies (ms) of sequential GET /hello for ``seconds``, and the rate."""
    latencies: list[float] = []
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        begun = time.monotonic()
        answer = client.get("/hello", headers=headers)
        if answer.status_code != 200:
            raise RuntimeError(f"GET /hello answered {answer.status_code}: {answer.text[:200]}")
        latencies.append((time.monotonic() - begun) * 1000)
    return latencies, len(latencies) / (time.monotonic() - started)


async def websocket_rtts(port: int, host: str, samples: int) -> list[float]:
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"http://127.0.0.1:{port}/ws", headers={"Host": host}) as socket:
            rtts = []
            for _ in range(samples + 1):
                begun = time.monotonic()
                await socket.send_str("0123456789abcdef")
                await socket.receive()
                rtts.append((time.monotonic() - begun) * 1000)
            return rtts[1:]  # the first warms the path


def first_byte_ms(port: int, host: str) -> float:
    begun = time.monotonic()
    with httpx.stream("GET", f"http://127.0.0.1:{port}/hello", headers={"Host": host}, timeout=180) as answer:
        first = next(answer.iter_raw())
        if answer.status_code != 200:
            raise RuntimeError(f"the wake request answered {answer.status_code}: {first[:300]!r}")
        return (time.monotonic() - begun) * 1000


def measure(
    figures: Figures,
    client: httpx.Client,
    settings: Settings,
    share_port: int,
    create: Callable[[dict], dict],
    *,
    seconds: float,
    ws_samples: int,
    wakes: int,
) -> str:
    """Run the phase on a VM from ``create``; returns its vm_id (the caller deletes it)."""
    record = create({"share": {"port": APP_PORT, "is_public": True}, "auto_resume": True})
    start_app(client, record["session_id"])
    share = record["share"]
    host = httpx.URL(share["url"]).netloc.decode()
    address = outside_address(settings, share["share_id"])
    with httpx.Client(base_url=f"http://{address}:{APP_PORT}", timeout=60) as direct:
        timed_requests(direct, {}, 0.5)  # warm-up
        latencies, rate = timed_requests(direct, {}, seconds)
    figures["share_direct_ms"].values.extend(latencies)
    figures["share_direct_rps"].add(rate)
    with httpx.Client(base_url=f"http://127.0.0.1:{share_port}", timeout=60) as routed:
        timed_requests(routed, {"Host": host}, 0.5)
        latencies, rate = timed_requests(routed, {"Host": host}, seconds)
    figures["share_ms"].values.extend(latencies)
    figures["share_rps"].add(rate)
    figures["share_ws_rtt_ms"].values.extend(asyncio.run(websocket_rtts(share_port, host, ws_samples)))
    for _ in range(wakes):
        suspended = client.post(f"/v1/vms/{record['vm_id']}/suspend")
        if suspended.status_code != 200 or suspended.json().get("status") != "suspended":
            raise RuntimeError(f"suspend answered {suspended.status_code}: {suspended.text[:200]}")
        figures["share_wake_first_byte_ms"].add(first_byte_ms(share_port, host))
    return str(record["vm_id"])
