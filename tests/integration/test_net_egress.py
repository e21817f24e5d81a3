"""Egress policy with real VMs, the egress daemon and a local outside world.

Each refusal is checked for its kind (a reset or an ICMP error, never a
timeout) and against the world's servers: what a policy refuses never
reached them, while a control shows the same server answers when allowed.
"""

from __future__ import annotations

import pytest
from guest_probes import probe, statuses
from net_fixtures import NetVmFactory
from outside_world import DOT_PORT, RAW_PORT, UDP_PORT, OutsideWorld

from kiln.config import Settings
from kiln.node.participant import EgressRules

# Each test asserts about the traffic it caused alone.
pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("quiet_world")]

CURL = "curl -sS -k --max-time 15 "
# curl's exit codes: 6 name not resolved, 7 refused (a reset to its SYN), 35 TLS
# handshake reset, 52/56 reset after the request. 28 would be a timeout (a
# silent drop), which the rules must never cause.
NOT_RESOLVED, REFUSED_AT_CONNECT, TLS_RESET = 6, 7, 35
RESET_AFTER_REQUEST = (52, 56)
WEB = EgressRules(allowed_domains=("allowed.test", "*.allowed.test"), allow_http=True, allow_https=True)


async def test_no_policy_reaches_nothing(net_vm: NetVmFactory, world: OutsideWorld) -> None:
    vm = await net_vm(EgressRules())
    results = await probe(
        vm,
        ("resolve", {"name": "allowed.test"}),
        ("tcp", {"host": world.allowed, "port": 80}),
        ("tcp", {"host": world.allowed, "port": 443}),
        ("tcp", {"host": world.raw, "port": RAW_PORT}),
        ("udp", {"host": world.allowed, "port": UDP_PORT}),
        ("icmp", {"host": world.allowed}),
        ("dns_udp", {"server": world.dns, "name": "allowed.test"}),
    )
    assert statuses(results) == [
        "dns-nxdomain",
        "refused",
        "refused",
        "refused",
        "unreachable",
        "unreachable",
        "unreachable",
    ], results
    assert world.seen.to("allowed-http") == world.seen.to("allowed-https") == world.seen.to("raw") == []
    assert not world.seen.datagrams


async def test_no_egress_means_no_network_at_all(network, egress_settings: Settings) -> None:
    from net_fixtures import MemoryLedger

    from kiln.node.participant import Launch, VmContext

    vm = VmContext("nonet1", None, 1, 256, None, egress_settings.vms_dir / "nonet1", egress=None)  # type: ignore[arg-type]
    launch, ledger = Launch(), MemoryLedger()
    await network.prepare(vm, launch, ledger)
    assert launch.nic is None and launch.owned_fds == [] and ledger.rows == {}


async def test_allowed_domain_over_allowed_schemes_only(net_vm: NetVmFactory, world: OutsideWorld) -> None:
    vm = await net_vm(EgressRules(allowed_domains=("allowed.test",), allow_https=True))
    https = await vm.run(CURL + "https://allowed.test/")
    assert (https.exit_code, https.stdout) == (0, "allowed-https host=allowed.test\n"), https
    http = await vm.run(CURL + "http://allowed.test/")
    assert http.exit_code == REFUSED_AT_CONNECT, http
    other = await vm.run(CURL + "https://denied.test/")
    assert other.exit_code == NOT_RESOLVED, other
    sub = await vm.run(CURL + "https://api.allowed.test/")  # not allowed: no wildcard in this policy
    assert sub.exit_code == NOT_RESOLVED, sub
    assert world.seen.to("allowed-http") == [] and world.seen.to("denied-https") == []


async def test_forged_host_or_sni_is_refused(net_vm: NetVmFactory, world: OutsideWorld) -> None:
    vm = await net_vm(WEB)
    assert (await vm.run(CURL + "http://allowed.test/")).stdout == "allowed-http host=allowed.test\n"
    assert (await vm.run(CURL + "https://api.allowed.test/")).stdout == "allowed-https host=api.allowed.test\n"
    before = len(world.seen.hosts)
    cases = {
        # an allowed name pointed at a denied address: the kernel resets the SYN
        "http allowed name -> denied address": (
            f"--resolve allowed.test:80:{world.denied} http://allowed.test/",
            (REFUSED_AT_CONNECT,),
        ),
        "https allowed name -> denied address": (
            f"--resolve allowed.test:443:{world.denied} https://allowed.test/",
            (REFUSED_AT_CONNECT,),
        ),
        # a denied name at an allowed (DNS-given) address: the proxy resets after reading it
        "http Host denied at allowed address": ("-H 'Host: denied.test' http://allowed.test/", RESET_AFTER_REQUEST),
        "https SNI denied at allowed address": (
            f"--resolve denied.test:443:{world.allowed} https://denied.test/",
            (TLS_RESET,),
        ),
        "direct IP over https": (f"https://{world.allowed}/", (TLS_RESET,)),
        "direct IP to a denied host": (f"http://{world.denied}/", (REFUSED_AT_CONNECT,)),
    }
    for label, (arguments, codes) in cases.items():
        ran = await vm.run(CURL + arguments)
        assert ran.exit_code in codes, (label, ran)
    assert world.seen.to("denied-http") == world.seen.to("denied-https") == []
    assert world.seen.hosts[before:] == [], "a forged request reached a server"


async def test_a_client_hello_in_many_segments(net_vm: NetVmFactory, world: OutsideWorld) -> None:
    vm = await net_vm(WEB)
    (resolved,) = await probe(vm, ("resolve", {"name": "allowed.test"}))
    assert resolved["detail"] == [world.allowed]
    results = await probe(
        vm,
        (
            "tls",
            {"host": world.allowed, "port": 443, "server_name": "allowed.test", "send": "ECHO split\n", "chunk": 40},
        ),
        (
            "tls",
            {"host": world.allowed, "port": 443, "server_name": "denied.test", "send": "ECHO split\n", "chunk": 40},
        ),
    )
    assert results[0]["status"] == "ok" and results[0]["detail"] == "ECHO split\n", results
    assert results[1]["status"] in ("reset", "closed", "tls-error") or results[1]["status"].startswith("tls-"), results


async def test_other_resolvers_dot_udp_icmp_and_ipv6_are_refused(net_vm: NetVmFactory, world: OutsideWorld) -> None:
    vm = await net_vm(WEB)
    results = await probe(
        vm,
        ("dns_udp", {"server": world.dns, "name": "denied.test"}),
        ("dns_tcp", {"server": world.dns, "name": "denied.test"}),
        ("dns_tcp", {"server": world.allowed, "name": "denied.test", "port": DOT_PORT}),
        ("udp", {"host": world.allowed, "port": 443}),  # QUIC's port
        ("udp", {"host": world.allowed, "port": UDP_PORT}),
        ("icmp", {"host": world.allowed}),
        ("tcp", {"host": "2001:db8::1", "port": 443, "v6": True}),
        ("dns_udp", {"server": "198.19.255.253", "name": "denied.test"}),  # Kiln's own: NXDOMAIN
    )
    assert statuses(results)[:6] == [
        "unreachable",
        "refused",
        "refused",
        "unreachable",
        "unreachable",
        "unreachable",
    ], results
    # net_config turns IPv6 off in the guest: it cannot even send (no address).
    assert results[6]["status"] == "OSError:[Errno 99] Cannot assign requested address", results
    assert results[7]["status"] == "ok" and results[7]["detail"].startswith("rcode=3 "), results
    # A guest that turns IPv6 back on and configures it itself meets a reset at the first hop.
    setup = await vm.run(
        "sysctl -qw net.ipv6.conf.all.disable_ipv6=0 net.ipv6.conf.eth0.disable_ipv6=0 && "
        "ip -6 address add 2001:db8:1::2/64 dev eth0 nodad && "
        "ip -6 route add default via fe80::6b:69ff:fe6c:6e01 dev eth0"
    )
    assert setup.exit_code == 0, setup
    (v6,) = await probe(vm, ("tcp", {"host": "2001:db8::1", "port": 443, "v6": True}))
    assert v6["status"] == "refused", v6
    assert world.seen.to("allowed-dot") == [] and not world.seen.datagrams
    assert "denied.test" not in world.dnsmasq_log()


async def test_an_allowed_cidr_admits_raw_tcp_and_only_names_what_it_says(
    net_vm: NetVmFactory, world: OutsideWorld
) -> None:
    vm = await net_vm(EgressRules(allowed_cidrs=(f"{world.raw}/32",)))
    results = await probe(
        vm,
        ("tcp", {"host": world.raw, "port": RAW_PORT, "send": "raw hello\n"}),
        ("icmp", {"host": world.raw}),
        ("tcp", {"host": world.private, "port": RAW_PORT}),
        ("tcp", {"host": world.allowed, "port": 80}),
    )
    assert [(r["status"], r["detail"]) for r in results[:2]] == [("ok", "raw hello\n"), ("ok", "echo-reply")], results
    assert statuses(results)[2:] == ["refused", "refused"], results
    # A private range opens only when a CIDR names it; 0.0.0.0/0 does not.
    everything = await net_vm(EgressRules(allowed_cidrs=("0.0.0.0/0",)))
    named = await net_vm(EgressRules(allowed_cidrs=(f"{world.private}/32",)))
    (via_everything,) = await probe(everything, ("tcp", {"host": world.private, "port": RAW_PORT}))
    (via_named,) = await probe(named, ("tcp", {"host": world.private, "port": RAW_PORT, "send": "inside\n"}))
    assert via_everything["status"] == "refused", via_everything
    assert (via_named["status"], via_named["detail"]) == ("ok", "inside\n"), via_named


async def test_private_answers_of_an_allowed_name_are_dropped(net_vm: NetVmFactory, world: OutsideWorld) -> None:
    vm = await net_vm(EgressRules(allowed_domains=("internal.test",), allow_http=True))
    (resolved,) = await probe(vm, ("resolve", {"name": "internal.test"}))
    assert resolved["detail"] == [], resolved  # NOERROR without addresses: nothing to rebind to
    ran = await vm.run(CURL + f"--resolve internal.test:80:{world.private} http://internal.test/")
    assert ran.exit_code == REFUSED_AT_CONNECT, ran
    assert world.seen.to("private-http") == []
