"""The nftables JSON Kiln writes (what each VM's rules say; the kernel's view is
in tests/integration/test_net_rules.py), and conntrack listings."""

from __future__ import annotations

import json

from kiln.config import Settings
from kiln.net.addresses import AddressPlan
from kiln.net.conntrack import parse_flows
from kiln.net.host import host_rules, never_reachable
from kiln.net.policy import compile_policy
from kiln.net.ruleset import add_vm, host_table, remove_vm, update_vm, vm_names
from kiln.node.participant import EgressRules

SETTINGS = Settings(uplink="eth9")
PLAN = AddressPlan.from_settings(SETTINGS)
RULES = host_rules(SETTINGS, PLAN)
LEASE = PLAN.lease(7)


def policy(**rules: object):
    return compile_policy(EgressRules(**rules), blocked=SETTINGS.net_blocked_cidrs, never=never_reachable(PLAN))  # type: ignore[arg-type]


def rules_of(commands: list[dict], chain: str) -> list[str]:
    return [
        json.dumps(c["add"]["rule"]["expr"])
        for c in commands
        if "rule" in c.get("add", {}) and c["add"]["rule"]["chain"] == chain
    ]


def test_deny_all_vm_has_no_redirect_and_refuses() -> None:
    commands = add_vm(LEASE, policy(), RULES)
    to_allowed = (
        '{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": "@vm7_cidrs"}}'
    )
    assert rules_of(commands, "vm7_nat") == [f'[{to_allowed}, {{"return": null}}]']
    out = rules_of(commands, "vm7_out")
    assert out[-1] == '[{"jump": {"target": "refuse"}}]'
    assert not any(
        "add" in c and "element" in c["add"] and c["add"]["element"]["name"] == "vm7_cidrs" for c in commands
    )


def test_https_only_redirects_443_to_the_proxy() -> None:
    commands = update_vm(LEASE, policy(allowed_domains=("a.example.com",), allow_https=True), RULES)
    nat = rules_of(commands, "vm7_nat")
    assert len(nat) == 2 and '"right": 443' in nat[1] and '"right": "@vm7_dns"' in nat[1]
    assert f'"addr": "{PLAN.host_address}", "port": {SETTINGS.net_proxy_port}' in nat[1]


def test_cidrs_become_set_elements() -> None:
    # A /28 inside the blocked TEST-NET-3 names it; 0.0.0.0/1 does not open 10/8.
    commands = update_vm(LEASE, policy(allowed_cidrs=("203.0.113.0/28", "0.0.0.0/1")), RULES)
    (elements,) = [c["add"]["element"]["elem"] for c in commands if "element" in c.get("add", {})]
    prefixes = [f"{e['prefix']['addr']}/{e['prefix']['len']}" for e in elements]
    assert "203.0.113.0/28" in prefixes and "1.0.0.0/8" in prefixes
    assert not any(p.startswith(("10.", "0.", "127.")) for p in prefixes)
    assert commands[0] == {"flush": {"set": {"family": "inet", "table": "kiln", "name": "vm7_cidrs"}}}


def test_uplink_bounds_forwarding_and_the_proxy() -> None:
    commands = host_table(RULES)
    from_vm = rules_of(commands, "from_vm")
    assert '"op": "!=", "left": {"meta": {"key": "oifname"}}, "right": "eth9"' in from_vm[0]
    assert any('"masquerade"' in r for r in rules_of(commands, "postrouting_nat"))
    closed = host_table(host_rules(Settings(), PLAN))
    assert rules_of(closed, "from_vm")[0] == '[{"jump": {"target": "refuse"}}]'
    assert rules_of(closed, "postrouting_nat") == []


def test_remove_deletes_only_what_is_there() -> None:
    names = vm_names(LEASE)
    present = [
        {"chain": {"name": names["out"]}},
        {"set": {"name": names["dns"]}},
        {
            "map": {
                "name": "forward_chains",
                "elem": [["kilnv7", {"jump": {"target": "vm7_out"}}], ["kilnv8", {"jump": {"target": "vm8_out"}}]],
            }
        },
        {"set": {"name": "vm_sources", "elem": [{"concat": ["kilnv7", "198.18.0.7"]}]}},
    ]
    commands = remove_vm("kiln", LEASE, present)
    assert [next(iter(c["delete"])) for c in commands] == ["element", "element", "chain", "set"]
    assert commands[0]["delete"]["element"]["elem"] == ["kilnv7"]


def test_conntrack_listing() -> None:
    listing = (
        "tcp      6 431999 ESTABLISHED src=198.18.0.2 dst=203.0.113.10 sport=40000 dport=80 "
        "src=203.0.113.10 dst=203.0.113.1 sport=80 dport=40000 [ASSURED] mark=0 use=1\n"
        "udp      17 29 src=198.18.0.2 dst=198.19.0.1 sport=5000 dport=53 [UNREPLIED] "
        "src=198.19.0.1 dst=198.18.0.2 sport=53 dport=5000 mark=0 use=1\n"
        "conntrack v1.4.7 (conntrack-tools): 2 flow entries have been shown.\n"
    )
    flows = parse_flows(listing)
    assert [(f.protocol, f.destination, f.reply_source) for f in flows] == [
        ("tcp", "203.0.113.10", "203.0.113.10"),
        ("udp", "198.19.0.1", "198.19.0.1"),
    ]
