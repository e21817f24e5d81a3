"""Phase ``egress`` of ``kiln bench``: what egress policies cost and how fast they act.

The phase runs a server of its own whose uplink is a local outside world: the
tests' ``tests/integration/outside_world.py`` (hosts in a network namespace,
named by dnsmasq, serving HTTP and a raw TCP echo), so no VM traffic leaves
the machine. It needs root, ``ip``, ``conntrack`` and dnsmasq; without them
its figures are null with the reason.

- ``create_with_policy_ms`` / ``create_without_policy_ms``: creates from the
  base snapshot with a policy (a CIDR, domains over HTTP and HTTPS) and
  without one (deny all: the VM is still wired), in pairs, each first in every
  other pair.
- ``egress_change_ms``: ``POST /v1/egress/vm/{id}`` replacing a policy that
  allows the world's echo server with one that allows nothing, until it answers.
- ``egress_effect_ms``: from that request's start until the last connection
  the old policy let through, as the echo server (on the host's clock) saw it.
  The guest connects in a tight loop and stops at its first refusal (a reset,
  never a timeout: to the SYN, or to a connection the change cut short); the
  resolution is one loop turn (``run.egress_loop_gap_ms``).
- ``egress_guest_http_mb_per_s`` / ``egress_host_http_mb_per_s``: one HTTP GET
  of N bytes from the world's web server by a guest (its allowed domain: DNS,
  kernel redirect and the egress proxy) and by the host itself (directly), the
  same small Python reader on both sides; ``egress_guest_direct_http_mb_per_s``:
  the same guest, the server's address allowed as a CIDR (no proxy), which
  tells the proxy's cost from the guest's own (TCG, virtio-net, NAT).
"""

from __future__ import annotations

import asyncio
import importlib
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from bench.stats import Figures

if TYPE_CHECKING:
    from bench.suite import Bench

FIGURES = (
    "create_without_policy_ms", "create_with_policy_ms", "egress_change_ms", "egress_effect_ms",
    "egress_host_http_mb_per_s", "egress_guest_http_mb_per_s", "egress_guest_direct_http_mb_per_s",
)  # fmt: skip
RAW_PORT = 7000
TRANSFER_MB = {"quick": 16, "full": 64}
TRANSFERS = {"quick": 2, "full": 5}
WAIT_SECONDS = 60.0
# Connections the guest's loop must have made before a change is timed.
LOOP_WARMUP_CONNECTIONS = 3

LOOP = r"""
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
made = 0
while True:
    try:
        socket.create_connection((host, port), 5).close()
        made += 1
    except (ConnectionRefusedError, ConnectionResetError):  # a reset: to the SYN, or to a connection cut short
        outcome = "refused"
        break
    except OSError as error:
        outcome = type(error).__name__
        break
open("/tmp/egress-loop.out", "w").write(f"{outcome} {made}\n")
"""

READER = r"""
import socket, sys, time
host, port, name, size = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
started = time.monotonic()
sock = socket.create_connection((host, port), 30)
sock.sendall(f"GET /bytes/{size} HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
received = 0
while chunk := sock.recv(1 << 20):
    received += len(chunk)
print(received, time.monotonic() - started)
"""


class EgressFailed(Exception):
    pass


def declare(figures: Figures) -> None:
    ms = "ms"
    figures.declare(
        "create_without_policy_ms",
        ms,
        note="POST /v1/vms?wait=true from the base snapshot, "
        "no egress_policy (a wired VM that reaches nothing), alternated with the next",
    )
    figures.declare(
        "create_with_policy_ms",
        ms,
        baseline="create_without_policy_ms",
        note="the same with an egress_policy: a CIDR and two domains over HTTP and HTTPS",
    )
    figures.declare(
        "egress_change_ms", ms, note="POST /v1/egress/vm/{id} (allow the echo server -> allow nothing) until it answers"
    )
    figures.declare(
        "egress_effect_ms",
        ms,
        baseline="egress_change_ms",
        note="from that request's start until the last connection the old policy let through "
        "(the echo server's clock; resolution: one turn of the guest's connect loop)",
    )
    figures.declare(
        "egress_host_http_mb_per_s",
        "MB/s",
        note="HTTP GET of N bytes by the host from the outside world's web server, directly",
    )
    figures.declare(
        "egress_guest_http_mb_per_s",
        "MB/s",
        baseline="egress_host_http_mb_per_s",
        note="the same GET by a guest, of its allowed domain (guest DNS, kernel redirect, egress proxy)",
    )
    figures.declare(
        "egress_guest_direct_http_mb_per_s",
        "MB/s",
        baseline="egress_host_http_mb_per_s",
        note="the same GET by the same guest of the server's address, allowed as a CIDR (no proxy)",
    )


def outside_world() -> Any:
    """The tests' outside world module (the bench runs from the checkout)."""
    directory = str(Path(__file__).resolve().parent.parent / "tests" / "integration")
    if directory not in sys.path:
        sys.path.append(directory)
    return importlib.import_module("outside_world")


def measure(bench: Bench) -> None:
    module = outside_world()
    reason = module.can_build_worlds()
    if reason is not None:
        raise EgressFailed(f"no local outside world to reach: {reason}")
    world = asyncio.run(module.OutsideWorld.create(f"kb{secrets.token_hex(2)}"))
    try:
        bench.start_server(pool_size=0, log_name="server-egress.log", env=world.server_env())
        try:
            with bench.client() as client:
                Egress(bench, client, world).run()
        finally:
            bench.stop_server()
    finally:
        asyncio.run(world.close())


class Egress:
    def __init__(self, bench: Bench, client: httpx.Client, world: Any) -> None:
        self.bench = bench
        self.client = client
        self.world = world
        self.figures = bench.figures

    def run(self) -> None:
        self.creates()
        self.changes()
        self.transfers()

    def creates(self) -> None:
        policy = {
            "allowed_cidrs": [f"{self.world.raw}/32"],
            "allowed_domains": ["allowed.test", "*.allowed.test"],
            "allow_http": True,
            "allow_https": True,
        }
        _, warm = self.bench.create_vm(self.client)  # the server's first create, not counted
        self.bench.delete_vm(self.client, warm["vm_id"])
        pair = [("create_without_policy_ms", None), ("create_with_policy_ms", policy)]
        for index in range(self.bench.plan.creates):
            # Each goes first in every other pair: a create right after a delete pays for its teardown.
            for name, body in pair if index % 2 == 0 else pair[::-1]:
                elapsed, record = self.bench.create_vm(self.client, {"egress_policy": body} if body else None)
                self.figures[name].add(elapsed)
                self.bench.delete_vm(self.client, record["vm_id"])

    def changes(self) -> None:
        raw = {"allowed_cidrs": [f"{self.world.raw}/32"]}
        _, record = self.bench.create_vm(self.client, {"egress_policy": raw})
        vm_id, session_id = record["vm_id"], record["session_id"]
        self.run_in(session_id, f"cat > /tmp/egress-loop.py <<'EOF'\n{LOOP}\nEOF")
        gaps: list[float] = []
        for _ in range(self.bench.plan.creates):
            self.set_policy(vm_id, raw)
            before = len(self.world.seen.times_to("raw"))
            self.run_in(
                session_id,
                "rm -f /tmp/egress-loop.out; "
                f"(setsid python3 /tmp/egress-loop.py {self.world.raw} {RAW_PORT} >/dev/null 2>&1 &)",
            )
            warm = before + LOOP_WARMUP_CONNECTIONS
            self.wait(
                lambda warm=warm: len(self.world.seen.times_to("raw")) >= warm, "the loop never reached the echo server"
            )
            started = time.monotonic()
            self.set_policy(vm_id, {})
            self.figures["egress_change_ms"].add((time.monotonic() - started) * 1000)
            outcome = self.wait(lambda: self.run_in(session_id, "cat /tmp/egress-loop.out 2>/dev/null || true").strip(),
                                "the guest's loop never stopped")  # fmt: skip
            if not outcome.startswith("refused"):
                raise EgressFailed(f"the first forbidden connection was not refused: {outcome}")
            accepted = self.world.seen.times_to("raw")[before:]
            self.figures["egress_effect_ms"].add(max(accepted[-1] - started, 0.0) * 1000)
            gaps += [(later - earlier) * 1000 for earlier, later in zip(accepted, accepted[1:], strict=False)]
        self.bench.run_info["egress_loop_gap_ms"] = round(sorted(gaps)[len(gaps) // 2], 1) if gaps else None
        self.bench.delete_vm(self.client, vm_id)

    def transfers(self) -> None:
        size = TRANSFER_MB[self.bench.plan.mode] << 20
        web = {"allowed_domains": ["allowed.test"], "allow_http": True}
        direct = {"allowed_cidrs": [f"{self.world.allowed}/32"]}
        _, record = self.bench.create_vm(self.client, {"egress_policy": web})
        vm_id, session_id = record["vm_id"], record["session_id"]
        self.run_in(session_id, f"cat > /tmp/egress-reader.py <<'EOF'\n{READER}\nEOF")
        reader = "python3 /tmp/egress-reader.py {} 80 allowed.test " + str(size)
        for _ in range(TRANSFERS[self.bench.plan.mode]):
            host = subprocess.run(
                [sys.executable, "-c", READER, self.world.allowed, "80", "allowed.test", str(size)],
                capture_output=True, text=True, timeout=300, check=True,
            )  # fmt: skip
            self.set_policy(vm_id, web)
            proxied = self.run_in(session_id, reader.format("allowed.test"))
            self.set_policy(vm_id, direct)
            plain = self.run_in(session_id, reader.format(self.world.allowed))
            for name, output in (
                ("egress_host_http_mb_per_s", host.stdout),
                ("egress_guest_http_mb_per_s", proxied),
                ("egress_guest_direct_http_mb_per_s", plain),
            ):
                received, seconds = output.split()
                if int(received) < size:
                    raise EgressFailed(f"{name}: {received} of {size} bytes arrived")
                self.figures[name].add(size / 2**20 / float(seconds))
        self.bench.delete_vm(self.client, vm_id)

    # -- helpers

    def set_policy(self, vm_id: str, policy: dict[str, Any]) -> None:
        response = self.client.post(f"/v1/egress/vm/{vm_id}", json=policy)
        if response.status_code != 200 or response.json().get("status") != "applied":
            raise EgressFailed(f"POST /v1/egress/vm/{vm_id} answered {response.status_code}: {response.text[:300]}")

    def run_in(self, session_id: str, command: str) -> str:
        response = self.client.post("/execute", json={"command": command, "session_id": session_id, "language": "bash"})
        if response.status_code != 200 or response.json().get("exit_code") != 0:
            raise EgressFailed(f"/execute answered {response.status_code}: {response.text[:300]}")
        return str(response.json().get("stdout", ""))

    def wait(self, condition: Any, failure: str) -> Any:
        deadline = time.monotonic() + WAIT_SECONDS
        while not (value := condition()):
            if time.monotonic() > deadline:
                raise EgressFailed(failure)
            time.sleep(0.05)
        return value
