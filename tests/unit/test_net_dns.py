"""The guest DNS with a fake upstream and a recording nftables runner (no sockets)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset

from kiln.config import Settings
from kiln.net.addresses import AddressPlan
from kiln.net.answers import AnswerBook
from kiln.net.dns import GuestDns, Resolved, Upstream, addresses_of
from kiln.net.feed import PolicyDirectory, VmEgress
from kiln.net.host import never_reachable
from kiln.net.registry import VmRegistry
from kiln.node.participant import EgressRules

SETTINGS = Settings()
PLAN = AddressPlan.from_settings(SETTINGS)
VM_ADDRESS = PLAN.lease(4).outside_address
UPSTREAM = {
    "allowed.example.com": Resolved(dns.rcode.NOERROR, ("203.0.113.7", "10.0.0.9"), 3600),
    "gone.example.com": Resolved(dns.rcode.NXDOMAIN),
}


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_dns(tmp_path: Path, rules: EgressRules) -> tuple[GuestDns, list[list[dict]], list[str], Clock]:
    feed = PolicyDirectory(tmp_path)
    feed.write(VmEgress("vm1", 4, VM_ADDRESS, rules))
    registry = VmRegistry(feed, PLAN, blocked=SETTINGS.net_blocked_cidrs, never=never_reachable(PLAN))
    registry.reload()
    transactions: list[list[dict]] = []
    clock = Clock()
    book = AnswerBook("kiln", clock=clock, run_nft=transactions.append)
    asked: list[str] = []

    async def resolve(name: str) -> Resolved:
        asked.append(name)
        return UPSTREAM.get(name, Resolved(dns.rcode.NXDOMAIN))

    # TEST-NET-3 counts as public here, as in the integration tests' world
    blocked = [ipaddress.IPv4Network(c) for c in SETTINGS.net_blocked_cidrs if c != "203.0.113.0/24"]
    server = GuestDns(registry, book, resolve, blocked=blocked, max_ttl=300, grace_seconds=60)
    return server, transactions, asked, clock


async def ask(server: GuestDns, name: str, rdtype: str = "A", source: str = VM_ADDRESS) -> dns.message.Message:
    wire = await server.answer(dns.message.make_query(name, rdtype).to_wire(), source)
    assert wire is not None
    return dns.message.from_wire(wire)


RULES = EgressRules(allowed_domains=("allowed.example.com", "*.example.com"), allow_https=True)


async def test_allowed_name_is_resolved_bounded_and_admitted(tmp_path: Path) -> None:
    server, transactions, asked, _ = make_dns(tmp_path, RULES)
    reply = await ask(server, "Allowed.Example.com")
    assert reply.rcode() == dns.rcode.NOERROR
    (rrset,) = reply.answer
    assert [r.address for r in rrset] == ["203.0.113.7"]  # the private answer is dropped
    assert rrset.ttl == 300
    assert asked == ["allowed.example.com"]
    added = transactions[-1][-1]["add"]["element"]
    assert added["name"] == "vm4_dns" and added["elem"] == [{"elem": {"val": "203.0.113.7", "timeout": 360}}]
    assert server.book.given("vm1", "allowed.example.com", "203.0.113.7")
    assert not server.book.given("vm1", "other.example.com", "203.0.113.7")


async def test_other_names_are_nxdomain_and_never_asked_upstream(tmp_path: Path) -> None:
    server, transactions, asked, _ = make_dns(tmp_path, RULES)
    for name in ("secret-data.attacker.net", "example.com", "allowed.example.com.attacker.net"):
        assert (await ask(server, name)).rcode() == dns.rcode.NXDOMAIN
    assert asked == [] and transactions == []


async def test_unknown_source_is_refused(tmp_path: Path) -> None:
    server, _, asked, _ = make_dns(tmp_path, RULES)
    assert (await ask(server, "allowed.example.com", source="203.0.113.50")).rcode() == dns.rcode.REFUSED
    assert asked == []


async def test_aaaa_of_an_allowed_name_is_empty(tmp_path: Path) -> None:
    server, _, asked, _ = make_dns(tmp_path, RULES)
    reply = await ask(server, "allowed.example.com", "AAAA")
    assert reply.rcode() == dns.rcode.NOERROR and reply.answer == [] and asked == []


async def test_upstream_nxdomain_passes(tmp_path: Path) -> None:
    server, _, _, _ = make_dns(tmp_path, RULES)
    assert (await ask(server, "gone.example.com")).rcode() == dns.rcode.NXDOMAIN


async def test_no_scheme_no_answers(tmp_path: Path) -> None:
    server, _, asked, _ = make_dns(tmp_path, EgressRules(allowed_domains=("allowed.example.com",)))
    assert (await ask(server, "allowed.example.com")).rcode() == dns.rcode.NXDOMAIN
    assert asked == []


async def test_answers_expire_and_policy_changes_prune(tmp_path: Path) -> None:
    server, transactions, _, clock = make_dns(tmp_path, RULES)
    await ask(server, "allowed.example.com")
    lease = PLAN.lease(4)
    removed = await server.book.keep_only("vm1", lease, lambda name: name != "allowed.example.com")
    assert removed == ["203.0.113.7"]
    assert transactions[-1][-1] == {
        "delete": {"element": {"family": "inet", "table": "kiln", "name": "vm4_dns", "elem": ["203.0.113.7"]}}
    }
    assert not server.book.given("vm1", "allowed.example.com", "203.0.113.7")
    await ask(server, "allowed.example.com")
    clock.now += 361
    assert not server.book.given("vm1", "allowed.example.com", "203.0.113.7")


async def test_responses_and_garbage_get_no_answer(tmp_path: Path) -> None:
    server, _, _, _ = make_dns(tmp_path, RULES)
    query = dns.message.make_query("allowed.example.com", "A")
    response = dns.message.make_response(query)
    assert await server.answer(response.to_wire(), VM_ADDRESS) is None
    assert await server.answer(b"\x00\x01garbage", VM_ADDRESS) is None


def test_cname_chains_are_followed() -> None:
    query = dns.message.make_query("www.example.com", "A")
    response = dns.message.make_response(query)
    response.answer = [
        dns.rrset.from_text("www.example.com.", 600, "IN", "CNAME", "cdn.example.net."),
        dns.rrset.from_text("cdn.example.net.", 60, "IN", "A", "203.0.113.8", "203.0.113.9"),
        dns.rrset.from_text("unrelated.example.org.", 60, "IN", "A", "203.0.113.66"),
    ]
    addresses, ttl = addresses_of(response, dns.name.from_text("www.example.com"))
    assert addresses == ("203.0.113.8", "203.0.113.9") and ttl == 60


def test_upstream_parsing() -> None:
    assert Upstream.parse("203.0.113.2") == Upstream("203.0.113.2", 53)
    assert Upstream.parse("203.0.113.2:5353") == Upstream("203.0.113.2", 5353)
    assert Upstream.parse("[2001:db8::1]:53") == Upstream("2001:db8::1", 53)
    assert Upstream.parse("") .port == 53
