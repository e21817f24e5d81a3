"""What the network participant leaves on the host: everything it made is
recorded first and removed by release; what a crashed run left is found by
inventory; the egress daemon outlives a server and is adopted or replaced."""

from __future__ import annotations

import os
import signal

import pytest
from guest_probes import probe
from net_fixtures import NetVmFactory
from outside_world import OutsideWorld

from kiln.config import Settings
from kiln.net import host as host_setup
from kiln.net import links, netns, nft
from kiln.net.addresses import AddressPlan
from kiln.net.feed import PolicyDirectory
from kiln.net.participant import NetParticipant
from kiln.node.ledger import MemoryLedger
from kiln.node.participant import EgressRules, HostResource, Launch, VmContext
from kiln.node.pipeline import Pipeline
from kiln.proxy.supervisor import EgressSupervisor

pytestmark = pytest.mark.vm


DENY_ALL = EgressRules()


def context(settings: Settings, vm_id: str, rules: EgressRules | None = DENY_ALL) -> VmContext:
    return VmContext(vm_id, None, 1, 256, None, settings.vms_dir / vm_id, egress=rules)  # type: ignore[arg-type]


async def on_host(settings: Settings, n: int) -> dict[str, bool]:
    """Which of lease n's host objects exist."""
    plan = AddressPlan.from_settings(settings)
    lease = plan.lease(n)
    table = nft.list_ruleset_of("inet", settings.net_nft_table)
    chains = {o["chain"]["name"] for o in table if "chain" in o}
    return {
        "netns": netns.exists(lease.netns),
        "veth": lease.host_veth in await links.host_links(),
        "nft-chain": f"vm{n}_out" in chains and f"vm{n}_nat" in chains,
    }


async def test_release_removes_everything_and_is_idempotent(network: NetParticipant, egress_settings: Settings) -> None:
    ledger, launch = MemoryLedger(), Launch()
    vm = context(egress_settings, "lifecycle1")
    await network.prepare(vm, launch, ledger)
    try:
        assert launch.nic is not None and launch.nic.tap_fd in launch.owned_fds
    finally:
        for fd in launch.owned_fds:
            os.close(fd)
    kinds = sorted(r.kind for r in ledger.rows.values())
    assert kinds == ["egress-policy", "lease", "netns", "nft-chain", "veth"]
    # every resource was recorded before the step that makes it
    assert [e[1] for e in ledger.events] == ["lease", "netns", "veth", "nft-chain", "egress-policy"]
    n = next(r.detail["n"] for r in ledger.rows.values())
    assert await on_host(egress_settings, n) == {"netns": True, "veth": True, "nft-chain": True}
    policy_file = PolicyDirectory(egress_settings.net_state_dir).path_of("lifecycle1")
    assert policy_file.exists() and oct(policy_file.parent.stat().st_mode & 0o777) == "0o700"

    # Reinstalling the table (a server restart) keeps the VM's rules.
    await host_setup.install(egress_settings, network.plan)
    assert (await on_host(egress_settings, n))["nft-chain"]

    resources = await ledger.of_vm("lifecycle1")
    await network.release("lifecycle1", resources, ledger)
    assert ledger.rows == {}
    assert await on_host(egress_settings, n) == {"netns": False, "veth": False, "nft-chain": False}
    assert not policy_file.exists()
    await network.release("lifecycle1", resources, ledger)  # again: nothing left to do, no error


async def test_inventory_finds_what_a_crashed_run_left(
    egress_settings: Settings, egress_daemon: EgressSupervisor
) -> None:
    crashed = NetParticipant(egress_settings)
    lost_ledger, launch = MemoryLedger(), Launch()
    await crashed.prepare(context(egress_settings, "crashed1"), launch, lost_ledger)
    for fd in launch.owned_fds:
        os.close(fd)
    n = next(r.detail["n"] for r in lost_ledger.rows.values())
    # The server died: its ledger rows are gone too. A new server looks at the host.
    restarted = NetParticipant(egress_settings)
    found = [r for r in await restarted.inventory() if r.detail.get("n") == n]
    assert sorted((r.kind, r.vm_id) for r in found) == [
        ("egress-policy", "crashed1"), ("lease", "crashed1"), ("netns", "crashed1"),
        ("nft-chain", "crashed1"), ("veth", "crashed1"),
    ]  # fmt: skip
    # A new VM meanwhile does not get the leftover's lease.
    other_ledger, other_launch = MemoryLedger(), Launch()
    await restarted.prepare(context(egress_settings, "after1"), other_launch, other_ledger)
    for fd in other_launch.owned_fds:
        os.close(fd)
    assert {r.detail["n"] for r in other_ledger.rows.values()} != {n}
    # The reconciler removes what no live VM owns.
    await restarted.release("crashed1", found, MemoryLedger())
    await restarted.release("after1", await other_ledger.of_vm("after1"), other_ledger)
    assert await on_host(egress_settings, n) == {"netns": False, "veth": False, "nft-chain": False}
    assert not [r for r in await restarted.inventory() if r.vm_id in ("crashed1", "after1")]


async def test_a_reconcile_pass_keeps_what_live_vms_own(network: NetParticipant, egress_settings: Settings) -> None:
    ledger, launch = MemoryLedger(), Launch()
    await network.prepare(context(egress_settings, "live1"), launch, ledger)
    for fd in launch.owned_fds:
        os.close(fd)
    n = next(r.detail["n"] for r in ledger.rows.values())
    pipeline = Pipeline(None, [network], ledger, 1.0)  # type: ignore[arg-type]

    async def live() -> set[str]:
        return {"live1"}

    # Every recorded resource is found on the host, the lease included (it has nothing of its own).
    result = await pipeline.reconcile(live)
    assert (result.removed, result.broken) == ([], {})
    assert await on_host(egress_settings, n) == {"netns": True, "veth": True, "nft-chain": True}
    await network.release("live1", await ledger.of_vm("live1"), ledger)


async def test_a_reconciler_that_saw_a_lease_before_it_was_reused_leaves_the_new_vm_alone(
    network: NetParticipant, egress_settings: Settings
) -> None:
    ledger = MemoryLedger()
    for vm_id in ("before1", "after2"):
        launch = Launch()
        if vm_id == "after2":
            # A pass listed the host while "before1" had the lease; it went, and
            # "after2" took the same lease (the same names) before the pass went on.
            seen = [r for r in await network.inventory() if r.vm_id == "before1"]
            await network.release("before1", await ledger.of_vm("before1"), ledger)
        await network.prepare(context(egress_settings, vm_id), launch, ledger)
        for fd in launch.owned_fds:
            os.close(fd)
    leases = {r.vm_id: r.detail["n"] for r in ledger.rows.values()}
    assert set(leases) == {"after2"}
    n = leases["after2"]
    assert {r.detail["n"] for r in seen} == {n}, "the lease was not reused: nothing to test"
    rows = dict(ledger.rows)

    await network.release("before1", [r for r in seen if r.kind != "egress-policy"], ledger)  # what the pass does

    assert await on_host(egress_settings, n) == {"netns": True, "veth": True, "nft-chain": True}
    assert ledger.rows == rows
    await network.release("after2", await ledger.of_vm("after2"), ledger)
    assert await on_host(egress_settings, n) == {"netns": False, "veth": False, "nft-chain": False}


async def test_a_failed_prepare_leaves_only_recorded_resources(
    network: NetParticipant, egress_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*args: object, **kwargs: object) -> None:
        raise netns.NetnsError("injected failure")

    monkeypatch.setattr(links, "create", broken)
    ledger = MemoryLedger()
    with pytest.raises(netns.NetnsError):
        await network.prepare(context(egress_settings, "failed1"), Launch(), ledger)
    recorded = await ledger.of_vm("failed1")
    assert sorted(r.kind for r in recorded) == ["lease", "netns", "veth"]
    n = recorded[0].detail["n"]
    await network.release("failed1", recorded, ledger)
    assert ledger.rows == {}
    assert await on_host(egress_settings, n) == {"netns": False, "veth": False, "nft-chain": False}


async def test_a_host_that_cannot_filter_gives_no_network(egress_settings: Settings) -> None:
    broken = NetParticipant(egress_settings.model_copy(update={"net_prefix": "far-too-long-prefix"}))
    status = await broken.start()
    assert not status.available and "KILN_NET_PREFIX" in status.reason
    launch, ledger = Launch(), MemoryLedger()
    await broken.prepare(context(egress_settings, "nonet2", EgressRules(allowed_cidrs=("0.0.0.0/0",))), launch, ledger)
    assert launch.nic is None and ledger.rows == {}


async def test_the_daemon_is_adopted_replaced_and_rereads_policies(
    net_vm: NetVmFactory, egress_daemon: EgressSupervisor, egress_settings: Settings, world: OutsideWorld
) -> None:
    vm = await net_vm(EgressRules(allowed_domains=("allowed.test",), allow_https=True))
    pid = egress_daemon.pid()
    assert pid is not None
    # A new server (a new supervisor) adopts the running daemon.
    assert await EgressSupervisor(egress_settings).start() == pid
    # One with other settings (another DNS upstream) gets a daemon of its own settings.
    other = egress_settings.model_copy(update={"dns_upstream": f"{world.dns}:53"})
    other_pid = await EgressSupervisor(other).start()
    assert other_pid != pid and not (await egress_daemon.ping() or {}).get("pid") == pid
    pid = await egress_daemon.start()  # and back, for the tests after this one
    assert pid != other_pid
    # A daemon killed with -9 is replaced, and the new one knows the VM from its policy file.
    os.kill(pid, signal.SIGKILL)
    new_pid = await egress_daemon.start()
    assert new_pid != pid
    ran = await vm.run("curl -sS -k --max-time 15 https://allowed.test/")
    assert ran.stdout == "allowed-https host=allowed.test\n", ran
    (denied,) = await probe(vm, ("resolve", {"name": "denied.test"}))
    assert denied["status"] == "dns-nxdomain"


def test_resources_name_their_lease() -> None:
    resource = HostResource("nft-chain", "kiln/vm12", "x", detail={})
    participant = NetParticipant(Settings())
    lease = participant._lease_of(resource)
    assert lease is not None and lease.n == 12
