"""Egress across the node's own VMs and the server's life, through a real
``kiln serve``: pool VMs (``KILN_POOL_SIZE=1``) claimed with their user's policy,
VMs that keep their rules, addresses and egress daemon across a ``kill -9`` of
the server and a restart, and a host that cannot filter, which says so and
gives VMs no network at all.

After each test every VM is gone and the server stopped; ``live_server``
then finds no namespace or link of it (and no QEMU process, no run dir).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from egress_helpers import (
    guest_address,
    ledger,
    outside_addresses,
    probe,
    set_egress,
    statuses,
    world_env,
)
from live_api import Api, live_server, process_exists, wait_until
from live_server import start_server
from outside_world import RAW_PORT, OutsideWorld

pytestmark = pytest.mark.vm

POOL_FILL_SECONDS = 120.0


def idle_pool_vm(api: Api, taken: set[str]) -> str:
    """The pool's idle VM, once it is ready to be claimed: the pool logs "pool VM
    <id> ready" (at debug level) right before it holds it, and never gave that
    VM out if it is not in ``taken``."""
    marker = re.compile(r"pool VM (vm-[0-9a-f]+) ready")

    def find() -> str | None:
        ready = marker.findall(api.server.log_path.read_text(errors="replace"))
        return next((vm_id for vm_id in ready if vm_id not in taken), None)

    assert wait_until(lambda: find() is not None, POOL_FILL_SECONDS), "the pool did not fill"
    found = find()
    assert found is not None
    return found


def reaches_raw(api: Api, session_id: str, world: OutsideWorld) -> str:
    (result,) = probe(api, session_id, ("tcp", {"host": world.raw, "port": RAW_PORT}))
    return str(result["status"])


def daemon_pid(api: Api) -> int:
    return int((api.settings.net_state_dir / "egress.pid").read_text())


def test_pool_vms_get_their_users_policy_and_everything_survives_a_kill_9(world: OutsideWorld) -> None:
    env = world_env(world, KILN_POOL_SIZE="1", KILN_LOG_LEVEL="debug")
    raw = {"allowed_cidrs": [f"{world.raw}/32"]}
    with live_server("kiln-egress-pool-", env=env) as api:
        idle = idle_pool_vm(api, set())
        first = api.create_ok(egress_policy=raw)
        assert first["vm_id"] == idle, "the create was not claimed from the pool"
        assert reaches_raw(api, first["session_id"], world) == "ok"

        refilled = idle_pool_vm(api, {idle})
        second = api.create_ok()
        assert second["vm_id"] == refilled
        assert reaches_raw(api, second["session_id"], world) == "refused"
        (resolved,) = probe(api, second["session_id"], ("resolve", {"name": "allowed.test"}))
        assert resolved["status"] == "dns-nxdomain", resolved
        for created in (first, second):
            assert guest_address(api, created["session_id"]) == "198.19.255.254/30"
        stale_idle = idle_pool_vm(api, {idle, refilled})
        before = outside_addresses(api)
        assert len({before[vm_id] for vm_id in (first["vm_id"], second["vm_id"], stale_idle)}) == 3, before
        pid = daemon_pid(api)

        api.server.stop(crash=True)
        api.connect(start_server(api.server.data_dir, env=env))

        assert api.http.get("/healthz").json()["networking"]["mode"] == "filtered"
        # The egress daemon was adopted, not replaced: DNS answers and proxied
        # connections of running VMs did not stop with the server.
        assert daemon_pid(api) == pid and process_exists(pid)
        # Adopted VMs keep their rules and their addresses.
        assert reaches_raw(api, first["session_id"], world) == "ok"
        assert reaches_raw(api, second["session_id"], world) == "refused"
        after = outside_addresses(api)
        assert (after[first["vm_id"]], after[second["vm_id"]]) == (before[first["vm_id"]], before[second["vm_id"]])
        # The old server's idle pool VM is nobody's: the restart removed it and everything it had.
        assert stale_idle not in after and not (api.settings.vms_dir / stale_idle).exists()
        assert all(vm_id != stale_idle for _, _, vm_id in ledger(api.server.data_dir))
        # Live changes still apply to adopted VMs.
        set_egress(api, f"vm/{first['vm_id']}")
        assert reaches_raw(api, first["session_id"], world) == "refused"
        set_egress(api, f"vm/{second['vm_id']}", **raw)
        assert reaches_raw(api, second["session_id"], world) == "ok"

        for created in (first, second):
            assert api.delete(created["vm_id"]).status_code == 200
        pool = idle_pool_vm(api, {idle, refilled, stale_idle})
        assert wait_until(lambda: {vm_id for _, _, vm_id in ledger(api.server.data_dir)} == {pool}, 10), ledger(
            api.server.data_dir
        )
        assert set(outside_addresses(api)) == {pool}


def test_a_host_that_cannot_filter_says_so_and_gives_vms_no_network(world: OutsideWorld) -> None:
    env = world_env(world, KILN_UPLINK="kilnnoup0")  # no such interface: Kiln cannot route egress
    with live_server("kiln-egress-off-", env=env) as api:
        health = api.http.get("/healthz").json()
        assert health["networking"]["mode"] == "off", health
        assert "KILN_UPLINK 'kilnnoup0'" in health["networking"]["reason"], health
        assert "guest networking is off" in api.server.log_tail(200)

        asking = api.create_ok(egress_policy={"allowed_cidrs": [f"{world.raw}/32"]})
        quiet = api.create_ok()
        record = api.vm(asking["vm_id"])
        assert record["network_error"] is not None and "kilnnoup0" in record["network_error"], record
        assert api.vm(quiet["vm_id"])["network_error"] is None
        # Its card goes nowhere: no address, no route, nothing reaches the world.
        sid = asking["session_id"]
        assert api.run(sid, "ip -4 -o address show dev eth0").strip() == ""
        seen = len(world.seen.to("raw"))
        assert statuses(probe(api, sid, ("tcp", {"host": world.raw, "port": RAW_PORT}))) == ["unreachable"]
        assert len(world.seen.to("raw")) == seen
        policy = api.http.get(f"/v1/egress/vm/{asking['vm_id']}").json()
        assert policy["status"] == "no_network" and policy["network_error"] == record["network_error"]
        assert outside_addresses(api) == {} and not Path(api.settings.net_state_dir, "egress.pid").exists()
