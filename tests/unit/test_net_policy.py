"""Egress policies as the node compiles them, and the address plan."""

from __future__ import annotations

import ipaddress

import pytest

from kiln.config import Settings
from kiln.net.addresses import AddressPlan, NetConfigError
from kiln.net.host import never_reachable
from kiln.net.policy import PolicyError, compile_policy, domain_allowed, rules_from_json, rules_to_json
from kiln.node.participant import EgressRules

SETTINGS = Settings()
PLAN = AddressPlan.from_settings(SETTINGS)


def compiled(**rules: object):
    return compile_policy(EgressRules(**rules), blocked=SETTINGS.net_blocked_cidrs, never=never_reachable(PLAN))  # type: ignore[arg-type]


def nets(*cidrs: str) -> tuple[ipaddress.IPv4Network, ...]:
    return tuple(ipaddress.IPv4Network(c) for c in cidrs)


def test_nothing_allowed_by_default() -> None:
    policy = compiled()
    assert policy.cidr_set == ()
    assert not policy.allows_name("example.com")
    assert not policy.proxies_http and not policy.proxies_https


def test_everything_means_the_public_internet() -> None:
    policy = compiled(allowed_cidrs=("0.0.0.0/0",))
    for private in ("10.1.2.3", "127.0.0.1", "169.254.169.254", "192.168.1.1", "172.16.0.1", "100.64.0.1"):
        assert not policy.allows_address(private), private
    assert not policy.allows_address(str(PLAN.pool.network_address + 5))  # another VM
    assert policy.allows_address("1.1.1.1")
    assert policy.allows_address("8.8.8.8")


def test_a_cidr_inside_a_private_range_names_it() -> None:
    policy = compiled(allowed_cidrs=("10.1.0.0/16", "192.168.7.7"))
    assert policy.cidr_set == nets("10.1.0.0/16", "192.168.7.7/32")
    assert policy.allows_address("10.1.200.3")
    assert not policy.allows_address("10.2.0.1")


def test_kiln_ranges_are_never_opened() -> None:
    policy = compiled(allowed_cidrs=(str(PLAN.pool), f"{PLAN.host_address}/32", "198.18.0.0/15"))
    assert policy.cidr_set, "the rest of 198.18.0.0/15 is named explicitly"
    for net in policy.cidr_set:
        assert not net.overlaps(PLAN.pool) and not net.overlaps(PLAN.guest_subnet), net
    assert not policy.allows_address(str(PLAN.host_address))
    assert policy.allows_address("198.19.7.7")


@pytest.mark.parametrize("bad", ["2001:db8::/32", "::/0", "10.0.0.0/33", "example.com", ""])
def test_bad_cidrs(bad: str) -> None:
    with pytest.raises(PolicyError):
        compiled(allowed_cidrs=(bad,))


@pytest.mark.parametrize("bad", ["*", "*.", "*.-a", "exa mple.com", "-a.com", "a..com", "*.*.a.com", "http://a.com"])
def test_bad_domains(bad: str) -> None:
    with pytest.raises(PolicyError):
        compiled(allowed_domains=(bad,))


def test_domain_matching() -> None:
    domains = ("api.example.com", "*.pkg.dev")
    assert domain_allowed("API.example.com.", domains)
    assert not domain_allowed("example.com", domains)
    assert not domain_allowed("evil-api.example.com", domains)
    assert domain_allowed("a.pkg.dev", domains)
    assert domain_allowed("a.b.pkg.dev", domains)
    assert not domain_allowed("pkg.dev", domains)
    assert not domain_allowed("apkg.dev", domains)


def test_schemes() -> None:
    policy = compiled(allowed_domains=("a.example.com",), allow_https=True)
    assert policy.allows_name("a.example.com")
    assert policy.allows_scheme("a.example.com", "https")
    assert not policy.allows_scheme("a.example.com", "http")
    # Domains without any scheme are useless: the DNS does not answer them.
    assert not compiled(allowed_domains=("a.example.com",)).allows_name("a.example.com")


def test_web_domains_take_both_schemes_whatever_the_flags_say() -> None:
    policy = compiled(
        allowed_domains=("a.example.com",), allow_https=True, web_domains=("pypi.org", "*.debian.org")
    )
    assert policy.proxies_http and policy.proxies_https
    for scheme in ("http", "https"):
        assert policy.allows_scheme("pypi.org", scheme)
        assert policy.allows_scheme("deb.debian.org", scheme)
    # The flags still hold for the policy's own domains.
    assert policy.allows_scheme("a.example.com", "https")
    assert not policy.allows_scheme("a.example.com", "http")
    assert not policy.allows_name("example.org")
    alone = compiled(web_domains=("pypi.org",))
    assert alone.allows_name("pypi.org") and alone.proxies_http and alone.proxies_https
    assert not alone.allows_name("files.pythonhosted.org")
    with pytest.raises(PolicyError):
        compiled(web_domains=("not a name",))


def test_rules_survive_their_json_form() -> None:
    rules = EgressRules(
        allowed_cidrs=("1.2.3.0/24",), allowed_domains=("a.test",), allow_http=True, web_domains=("pypi.org",)
    )
    assert rules_from_json(rules_to_json(rules)) == rules
    # Files written before web_domains existed still read.
    assert rules_from_json({"allowed_cidrs": [], "allowed_domains": ["a.test"], "allow_https": True}) == EgressRules(
        allowed_domains=("a.test",), allow_https=True
    )


def test_address_plan() -> None:
    assert PLAN.guest_net_config() == {
        "mac": "52:54:00:4b:49:4c",
        "address": "198.19.255.254/30",
        "gateway": "198.19.255.253",
        "nameservers": ["198.19.255.253"],
        "mtu": 1500,
    }
    lease = PLAN.lease(3)
    assert (lease.outside_address, lease.netns, lease.host_veth) == ("198.18.0.3", "kilnns-3", "kilnv3")
    assert PLAN.lease_of_address("198.18.0.3") == 3
    assert PLAN.lease_of_veth("kilnv3") == 3 and PLAN.lease_of_veth("kilnv03") is None
    assert PLAN.lease_of_netns("kilnns-12") == 12 and PLAN.lease_of_netns("otherns-12") is None
    with pytest.raises(ValueError):
        PLAN.lease(0)


@pytest.mark.parametrize(
    "changes",
    [
        {"net_prefix": "averylongprefix"},
        {"net_prefix": "Kiln"},
        {"net_host_address": "198.18.0.7"},
        {"net_guest_subnet": "198.18.0.0/30"},
        {"net_guest_subnet": "198.19.255.255/32"},
    ],
)
def test_contradicting_settings(changes: dict[str, str]) -> None:
    with pytest.raises(NetConfigError):
        AddressPlan.from_settings(Settings(**changes))  # type: ignore[arg-type]
