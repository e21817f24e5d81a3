"""Egress through a real ``kiln serve``: the server's environment for the
outside world (``outside_world.py``), network probes run in guests through
``/execute``, where each VM's network is, and what a server's networking left.
"""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path
from typing import Any

from guest_probes import probe_script
from live_api import SMALL, Api, wait_until
from outside_world import OutsideWorld

from kiln.config import Settings
from kiln.net import netns, nft
from kiln.net.feed import PolicyDirectory

CURL = "curl -sS -k --max-time 15 "
# curl's exit codes: 6 name not resolved, 7 refused (a reset to its SYN).
NOT_RESOLVED, REFUSED_AT_CONNECT = 6, 7
NETWORK_KINDS = ("lease", "netns", "veth", "nft-chain", "egress-policy")
VM_OBJECT = re.compile(r"vm\d+_")


def world_env(world: OutsideWorld, **extra: str) -> dict[str, str]:
    """A server whose VMs reach the world (``OutsideWorld.server_env``), of the
    cached base snapshot's shape by default."""
    return {
        **world.server_env(),
        "KILN_DEFAULT_MEMORY_MB": str(SMALL["memory_mb"]),
        "KILN_DEFAULT_VCPU_COUNT": str(SMALL["vcpu_count"]),
        **extra,
    }


def probe(api: Api, session_id: str, *probes: tuple[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """``guest_probes`` probes run in the session's VM through ``/execute``."""
    response = api.http.post(
        "/execute", json={"session_id": session_id, "command": probe_script(*probes), "language": "python"}
    )
    assert response.status_code == 200, f"{response.text}\n--- server log ---\n{api.server.log_tail(60)}"
    out = response.json()["stdout"]
    results: list[dict[str, Any]] = json.loads(out.strip().splitlines()[-1])
    return results


def statuses(results: list[dict[str, Any]]) -> list[str]:
    return [result["status"] for result in results]


def curl(api: Api, session_id: str, arguments: str) -> tuple[int, str]:
    """curl in the guest: (exit code, stdout)."""
    out = api.run(session_id, f'{CURL}{arguments}; echo "exit=$?"')
    body, _, code = out.rpartition("exit=")
    return int(code), body


def egress(api: Api, vm_id: str) -> dict[str, Any]:
    response = api.http.get(f"/v1/egress/vm/{vm_id}")
    assert response.status_code == 200, response.text
    return response.json()


def set_egress(api: Api, path: str, **policy: Any) -> dict[str, Any]:
    """POST the policy to ``/v1/egress/<path>`` (``vm/<id>`` or ``session/<sid>``)."""
    response = api.http.post(f"/v1/egress/{path}", json=policy)
    assert response.status_code == 200, response.text
    return response.json()


def outside_addresses(api: Api) -> dict[str, str]:
    """Each wired VM's outside address, as the server published it to its egress daemon."""
    published = PolicyDirectory(api.settings.net_state_dir).published()
    return {vm_id: egress.outside_address for vm_id, egress in published.items()}


def guest_address(api: Api, session_id: str) -> str:
    return api.run(session_id, "ip -4 -o address show dev eth0 | awk '{print $4}'").strip()


def ledger(data_dir: Path) -> list[tuple[str, str, str]]:
    """The server's recorded host resources of the network: (kind, name, vm_id)."""
    with sqlite3.connect(data_dir / "kiln.db") as db:
        rows = db.execute("SELECT kind, name, vm_id FROM host_resources").fetchall()
    return [(kind, name, vm_id) for kind, name, vm_id in rows if kind in NETWORK_KINDS]


def network_leftovers(settings: Settings) -> list[str]:
    """What of its networking a server (that has no VMs any more) still has on the host."""
    left = [f"ledger {row}" for row in ledger(settings.data_dir)]
    left += [f"policy file of {vm_id}" for vm_id in PolicyDirectory(settings.net_state_dir).published()]
    for obj in nft.list_ruleset_of("inet", settings.net_nft_table):
        body = obj.get("chain") or obj.get("set") or obj.get("map") or {}
        # A VM's own chains and sets (vm<lease>_out, ...), or its elements in the shared sets and maps.
        if VM_OBJECT.match(body.get("name", "")) or body.get("elem"):
            left.append(f"nft {obj}")
    left += [f"netns {name}" for name in netns.names() if name.startswith(f"{settings.net_prefix}ns-")]
    return left


def nothing_left_eventually(settings: Settings) -> list[str]:
    """``network_leftovers`` once a VM deleted a moment ago has released everything (bounded wait)."""
    wait_until(lambda: not network_leftovers(settings), 10)
    return network_leftovers(settings)


# A connection kept open across a policy change (raw TCP to an echo server):
# it sends once, waits for /tmp/go-<name>, sends again and says what happened.
HOLD = r"""
import os, socket, sys, time
name, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
out = open("/tmp/hold-" + name + ".out", "w", buffering=1)
sock = socket.create_connection((host, port), 10)
sock.settimeout(10)
sock.sendall(b"one\n")
out.write("first " + sock.recv(100).decode().strip() + "\n")
for _ in range(1200):
    if os.path.exists("/tmp/go-" + name):
        break
    time.sleep(0.05)
try:
    sock.sendall(b"two\n")
    data = sock.recv(100)
    out.write("second " + (data.decode().strip() if data else "eof") + "\n")
except Exception as e:
    out.write("second " + type(e).__name__ + "\n")
"""


def hold(api: Api, session_id: str, name: str, host: str, port: int) -> None:
    api.run(session_id, f"cat > /tmp/hold.py <<'EOF'\n{HOLD}\nEOF")
    started = api.run(
        session_id,
        f"(setsid python3 /tmp/hold.py {name} {host} {port} >/tmp/hold-{name}.err 2>&1 &) ; "
        f"for i in $(seq 200); do grep -q first /tmp/hold-{name}.out 2>/dev/null && break; sleep 0.05; done; "
        f"cat /tmp/hold-{name}.out /tmp/hold-{name}.err",
    )
    assert "first one" in started, started


def release_hold(api: Api, session_id: str, name: str) -> str:
    """Let the held connection send again; what it saw."""
    return api.run(
        session_id,
        f"touch /tmp/go-{name}; for i in $(seq 400); do grep -q second /tmp/hold-{name}.out && break; "
        f"sleep 0.05; done; cat /tmp/hold-{name}.out",
    )
