"""Live policy changes on a running VM: atomic, in force at once, closing what they forbid."""

from __future__ import annotations

import time

import pytest
from guest_probes import probe, statuses
from net_fixtures import NetVm, NetVmFactory
from outside_world import RAW_PORT, OutsideWorld

from kiln.net.participant import NetParticipant
from kiln.net.policy import PolicyError
from kiln.node.participant import EgressRules

pytestmark = pytest.mark.vm

# Two connections kept open across the change: raw TCP (a CIDR) and TLS through
# the egress proxy (a domain). Each sends once, waits for /tmp/go, sends again.
HOLD = r"""
import os, socket, ssl, sys, time
def wait():
    for _ in range(600):
        if os.path.exists("/tmp/go"):
            return
        time.sleep(0.05)
    raise SystemExit("no /tmp/go")
def exchange(sock, send, recv):
    sock.sendall(send)
    return recv()
kind, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
out = open("/tmp/" + kind + ".out", "w", buffering=1)
raw = socket.create_connection((host, port), 10)
raw.settimeout(10)
if kind == "tls":
    ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
    sock = ctx.wrap_socket(raw, server_hostname="allowed.test")
    first = b"ECHO one\n"
else:
    sock, first = raw, b"one\n"
sock.sendall(first)
out.write("first " + sock.recv(100).decode().strip() + "\n")
wait()
try:
    sock.sendall(b"two\n")
    data = sock.recv(100)
    out.write("second " + (data.decode().strip() if data else "eof") + "\n")
except Exception as e:
    out.write("second " + type(e).__name__ + "\n")
"""


async def hold(vm: NetVm, kind: str, host: str, port: int) -> None:
    await vm.run("rm -f /tmp/go && cat > /tmp/hold.py", stdin=HOLD)
    started = await vm.run(
        f"(setsid python3 /tmp/hold.py {kind} {host} {port} >/tmp/{kind}.err 2>&1 &) ; "
        f"for i in $(seq 200); do grep -q first /tmp/{kind}.out 2>/dev/null && break; sleep 0.05; done; "
        f"cat /tmp/{kind}.out"
    )
    assert "first" in started.stdout, (started, (await vm.run(f"cat /tmp/{kind}.err")).stdout)


async def outcome(vm: NetVm, kind: str) -> str:
    ran = await vm.run(
        f"for i in $(seq 300); do grep -q second /tmp/{kind}.out && break; sleep 0.05; done; cat /tmp/{kind}.out"
    )
    return ran.stdout


async def test_a_live_change_takes_effect_and_closes_what_it_forbids(
    net_vm: NetVmFactory, network: NetParticipant, world: OutsideWorld
) -> None:
    before = EgressRules(allowed_cidrs=(f"{world.raw}/32",), allowed_domains=("allowed.test",), allow_https=True)
    vm = await net_vm(before)
    await hold(vm, "raw", world.raw, RAW_PORT)
    (resolved,) = await probe(vm, ("resolve", {"name": "allowed.test"}))
    assert resolved["detail"] == [world.allowed]
    await hold(vm, "tls", world.allowed, 443)

    started = time.monotonic()
    await network.apply_policy(vm.vm_id, EgressRules())
    print(f"policy change applied in {1000 * (time.monotonic() - started):.1f} ms")
    assert network.policy_of(vm.vm_id) == EgressRules()
    results = await probe(
        vm,
        ("tcp", {"host": world.raw, "port": RAW_PORT}),
        ("resolve", {"name": "allowed.test"}),
        ("tcp", {"host": world.allowed, "port": 443}),
    )
    assert statuses(results) == ["refused", "dns-nxdomain", "refused"], results

    await vm.run("touch /tmp/go")
    raw, tls = await outcome(vm, "raw"), await outcome(vm, "tls")
    assert "first one" in raw and "second one" not in raw and "second two" not in raw, raw
    assert "second ConnectionResetError" in raw or "second eof" in raw, raw
    assert "first ECHO one" in tls and "second two" not in tls, tls

    # And back: the same VM reaches both again.
    await network.apply_policy(vm.vm_id, before)
    results = await probe(
        vm, ("tcp", {"host": world.raw, "port": RAW_PORT, "send": "again\n"}), ("resolve", {"name": "allowed.test"})
    )
    assert [r["status"] for r in results] == ["ok", "ok"] and results[0]["detail"] == "again\n", results


async def test_a_policy_that_cannot_apply_keeps_the_old_one(
    net_vm: NetVmFactory, network: NetParticipant, world: OutsideWorld
) -> None:
    rules = EgressRules(allowed_cidrs=(f"{world.raw}/32",))
    vm = await net_vm(rules)
    with pytest.raises(PolicyError):
        await network.apply_policy(vm.vm_id, EgressRules(allowed_cidrs=("2001:db8::/32",)))
    assert network.policy_of(vm.vm_id) == rules
    (result,) = await probe(vm, ("tcp", {"host": world.raw, "port": RAW_PORT, "send": "still\n"}))
    assert (result["status"], result["detail"]) == ("ok", "still\n")
