"""What vaults change in the egress path, without sockets: the feed carries a VM's
injections, the guest DNS answers their hosts, the kernel's redirects, and the
transparent proxy's choice between intercepting, splicing and refusing."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import cast

import dns.message
import dns.rcode

from kiln.config import Settings
from kiln.net.addresses import AddressPlan
from kiln.net.answers import AnswerBook
from kiln.net.dns import GuestDns, Resolved
from kiln.net.feed import PolicyDirectory, VmEgress
from kiln.net.host import host_rules, never_reachable
from kiln.net.policy import compile_policy
from kiln.net.registry import VmRegistry
from kiln.net.ruleset import update_vm
from kiln.node.participant import EgressRules
from kiln.proxy.intercept import Interceptor
from kiln.proxy.transparent import Spliced, TransparentProxy
from kiln.vault.binding import Injection

SETTINGS = Settings(uplink="eth9")
PLAN = AddressPlan.from_settings(SETTINGS)
LEASE = PLAN.lease(5)
NEVER = never_reachable(PLAN)
SERVICE = Injection("vault_1", "svc_1", "*.echo.test", "Authorization", "Bearer ", "cred_1", "KEY", "v1.k.sealed")
SERVICE_ADDRESS = "203.0.113.9"


def registry_with(tmp_path: Path, rules: EgressRules, injections: tuple[Injection, ...]) -> VmRegistry:
    feed = PolicyDirectory(tmp_path)
    feed.write(VmEgress("vm1", LEASE.n, LEASE.outside_address, rules, 1, injections))
    registry = VmRegistry(feed, PLAN, blocked=SETTINGS.net_blocked_cidrs, never=NEVER)
    registry.reload()
    return registry


def test_the_feed_carries_injections_and_reads_files_without_them(tmp_path: Path) -> None:
    feed = PolicyDirectory(tmp_path)
    egress = VmEgress("vm1", LEASE.n, LEASE.outside_address, EgressRules(), 3, (SERVICE,))
    feed.write(egress)
    assert feed.published() == {"vm1": egress}
    older = egress.to_json()
    del older["injections"]  # a file written before vaults existed
    feed.path_of("vm2").write_text(json.dumps(older | {"vm_id": "vm2"}))
    assert feed.published()["vm2"].injections == ()


def test_a_rotation_is_a_change_the_daemon_reloads(tmp_path: Path) -> None:
    registry = registry_with(tmp_path, EgressRules(), (SERVICE,))
    rotated = Injection(**(SERVICE.to_json() | {"sealed_value": "v1.k.other"}))
    registry.feed.write(VmEgress("vm1", LEASE.n, LEASE.outside_address, EgressRules(), 2, (rotated,)))
    changed, gone = registry.reload()
    assert [vm.vm_id for vm in changed] == ["vm1"] and gone == []
    vm = registry.by_id("vm1")
    assert vm is not None and vm.injection_for("api.echo.test") == rotated
    assert vm.allows_name("api.echo.test") and not vm.allows_name("echo.test")  # one level below only


async def test_the_guest_dns_answers_a_service_host_no_policy_lists(tmp_path: Path) -> None:
    registry = registry_with(tmp_path, EgressRules(), (SERVICE,))
    transactions: list[list[dict]] = []
    book = AnswerBook("kiln", run_nft=transactions.append)

    async def resolve(name: str) -> Resolved:
        return Resolved(dns.rcode.NOERROR, (SERVICE_ADDRESS,), 60)

    blocked = [ipaddress.IPv4Network(c) for c in SETTINGS.net_blocked_cidrs if c != "203.0.113.0/24"]
    server = GuestDns(registry, book, resolve, blocked=blocked, max_ttl=300, grace_seconds=60)

    async def ask(name: str) -> dns.message.Message:
        wire = await server.answer(dns.message.make_query(name, "A").to_wire(), LEASE.outside_address)
        assert wire is not None
        return dns.message.from_wire(wire)

    assert (await ask("api.echo.test")).rcode() == dns.rcode.NOERROR
    assert book.given("vm1", "api.echo.test", SERVICE_ADDRESS)
    assert (await ask("elsewhere.test")).rcode() == dns.rcode.NXDOMAIN


def test_a_vm_with_vaults_sends_web_traffic_to_the_proxy_before_its_cidrs() -> None:
    rules = host_rules(SETTINGS, PLAN)
    policy = compile_policy(EgressRules(allowed_cidrs=("0.0.0.0/0",)), blocked=SETTINGS.net_blocked_cidrs, never=NEVER)

    def nat(intercepts: bool) -> list[str]:
        return [
            json.dumps(c["add"]["rule"]["expr"])
            for c in update_vm(LEASE, policy, rules, intercepts=intercepts)
            if "rule" in c.get("add", {}) and c["add"]["rule"]["chain"] == f"{LEASE.chain_prefix}_nat"
        ]

    plain = nat(False)
    assert len(plain) == 1 and '"return"' in plain[0]  # CIDRs only: everything goes direct
    with_vaults = nat(True)
    assert len(with_vaults) == 3 and '"return"' in with_vaults[2]
    assert '"right": 80' in with_vaults[0] and '"right": 443' in with_vaults[1]
    assert all(f'"@{LEASE.chain_prefix}_dns"' in rule for rule in with_vaults[:2])


async def test_the_proxy_intercepts_covered_names_splices_allowed_ones_and_refuses_the_rest(tmp_path: Path) -> None:
    rules = EgressRules(allowed_domains=("allowed.test",), allowed_cidrs=("198.51.100.0/24",), allow_https=True)
    registry = registry_with(tmp_path, rules, (SERVICE,))
    book = AnswerBook("kiln", run_nft=lambda commands: None)
    proxy = TransparentProxy(
        registry, book, host_address=str(PLAN.host_address), mark=1, interceptor=cast(Interceptor, object())
    )
    vm = registry.by_id("vm1")
    assert vm is not None

    await book.give("vm1", LEASE, "api.echo.test", [SERVICE_ADDRESS], 60)
    await book.give("vm1", LEASE, "allowed.test", ["203.0.113.20"], 60)
    assert proxy.intercepts(vm, "api.echo.test", SERVICE_ADDRESS)
    assert not proxy.intercepts(vm, "api.echo.test", "203.0.113.99")  # not what the DNS gave for it
    assert not proxy.intercepts(vm, "allowed.test", "203.0.113.20")
    assert proxy.admits(vm, "allowed.test", "https", "203.0.113.20")
    assert proxy.admits(vm, "anything.example", "https", "198.51.100.7")  # a CIDR admits any name
    assert not proxy.admits(vm, "anything.example", "https", "203.0.113.20")

    # A reload without the service closes its intercepted connections, not the others.
    intercepted = Spliced("vm1", "api.echo.test", "https", SERVICE_ADDRESS, intercepted=True)
    spliced = Spliced("vm1", "allowed.test", "https", "203.0.113.20")
    proxy.live["vm1"] = {intercepted, spliced}
    assert proxy.recheck("vm1") == 0
    registry.feed.write(VmEgress("vm1", LEASE.n, LEASE.outside_address, rules, 2, ()))
    registry.reload()
    assert proxy.recheck("vm1") == 1
