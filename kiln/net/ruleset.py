"""The nftables rules, as JSON command lists (pure: ``kiln.net.nft`` runs them).

Two tables:

- on the host, Kiln's table (``KILN_NET_NFT_TABLE``, family inet): base chains
  shared by every VM, and per VM (lease ``n``) two sets and two chains, reached
  through verdict maps keyed by the VM's host veth name;
- inside each VM's namespace, a small fixed table: NAT between the guest's
  address and its outside address, the guest DNS redirect, IPv6 refused.

Per VM on the host (``vm<n>`` is the lease's chain prefix)::

    set   vm<n>_cidrs   its allowed CIDRs (interval set)
    set   vm<n>_dns     addresses the guest DNS gave it (timeouts; the egress daemon adds them)
    chain vm<n>_out     forward: ip daddr @vm<n>_cidrs accept, else refuse
    chain vm<n>_nat     dstnat: TCP 80/443 to a DNS-given address -> the egress proxy
    elements            vm_sources (veth . outside address), forward_chains, nat_chains
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kiln.net.addresses import INNER_VETH_NAME, TAP_NAME, AddressPlan, Lease
from kiln.net.policy import CompiledPolicy

Json = dict[str, Any]
FAMILY = "inet"
NETNS_TABLE = "kiln"

# Chains of Kiln's host table shared by every VM.
REFUSE = "refuse"
FROM_VM = "from_vm"
TO_VM = "to_vm"
FROM_VM_INPUT = "from_vm_input"
VM_SOURCES = "vm_sources"
FORWARD_CHAINS = "forward_chains"
NAT_CHAINS = "nat_chains"
BASE_CHAINS = ("prerouting_filter", "prerouting_nat", "forward", "input", "output", "postrouting_nat")
REGULAR_CHAINS = (REFUSE, FROM_VM, TO_VM, FROM_VM_INPUT)


@dataclass(frozen=True)
class HostRules:
    """What the host table's shared chains depend on."""

    table: str
    plan: AddressPlan
    uplink: str  # "" = nothing leaves the host
    dns_port: int
    proxy_port: int
    egress_mark: int


# ---- expression helpers (nft's JSON schema, libnftables-json(5))


def _meta(key: str) -> Json:
    return {"meta": {"key": key}}


def _payload(protocol: str, field: str) -> Json:
    return {"payload": {"protocol": protocol, "field": field}}


def _match(left: Json, right: Any, op: str = "==") -> Json:
    return {"match": {"op": op, "left": left, "right": right}}


def _prefix(network: Any) -> Json:
    return {"prefix": {"addr": str(network.network_address), "len": network.prefixlen}}


def _jump(chain: str) -> Json:
    return {"jump": {"target": chain}}


def _dnat(address: str, port: int | None = None) -> Json:
    dnat: Json = {"family": "ip", "addr": address}
    if port is not None:
        dnat["port"] = port
    return {"dnat": dnat}


ACCEPT: Json = {"accept": None}
DROP: Json = {"drop": None}
RETURN: Json = {"return": None}
ESTABLISHED = _match({"ct": {"key": "state"}}, ["established", "related"], "in")


def _table(name: str) -> Json:
    return {"family": FAMILY, "name": name}


def _chain(table: str, name: str, **hook: Any) -> Json:
    return {"chain": {"family": FAMILY, "table": table, "name": name, **hook}}


def _set(table: str, name: str, flag: str) -> Json:
    """A named set of IPv4 addresses (``interval``: CIDRs; ``timeout``: DNS answers)."""
    return {"family": FAMILY, "table": table, "name": name, "type": "ipv4_addr", "flags": [flag]}


def _base(table: str, name: str, kind: str, hook: str, prio: int) -> Json:
    return _chain(table, name, type=kind, hook=hook, prio=prio, policy="accept")


def _rule(table: str, chain: str, *expr: Json) -> Json:
    return {"add": {"rule": {"family": FAMILY, "table": table, "chain": chain, "expr": list(expr)}}}


def _flush_chain(table: str, chain: str) -> Json:
    return {"flush": {"chain": {"family": FAMILY, "table": table, "name": chain}}}


# ---- the host table


def host_table(rules: HostRules) -> list[Json]:
    """Create Kiln's table if needed and (re)write its shared chains, in one
    transaction. Per-VM chains, sets and map elements are kept: this runs at
    every start, with VMs running."""
    t = rules.table
    veths = rules.plan.host_veth_pattern
    host = str(rules.plan.host_address)
    commands: list[Json] = [{"add": {"table": _table(t)}}]
    commands += [
        {"add": {"set": {"family": FAMILY, "table": t, "name": VM_SOURCES, "type": ["ifname", "ipv4_addr"]}}},
        {"add": {"map": {"family": FAMILY, "table": t, "name": FORWARD_CHAINS, "type": "ifname", "map": "verdict"}}},
        {"add": {"map": {"family": FAMILY, "table": t, "name": NAT_CHAINS, "type": "ifname", "map": "verdict"}}},
    ]
    hooks = {
        # Before conntrack's NAT: anti-spoofing sees what the VM sent.
        "prerouting_filter": ("filter", "prerouting", -150),
        "prerouting_nat": ("nat", "prerouting", -100),
        "forward": ("filter", "forward", 0),
        "input": ("filter", "input", 0),
        "output": ("filter", "output", 0),
        "postrouting_nat": ("nat", "postrouting", 100),
    }
    for name in REGULAR_CHAINS:
        commands.append({"add": _chain(t, name)})
    for name, (kind, hook, prio) in hooks.items():
        commands.append({"add": _base(t, name, kind, hook, prio)})
    for name in (*REGULAR_CHAINS, *BASE_CHAINS):
        commands.append(_flush_chain(t, name))

    from_veth = _match(_meta("iifname"), veths)
    # refuse: a reset for TCP, an ICMP error for the rest; never a silent drop
    # (a client waits out its timeout) nor an accept followed by a close.
    commands += [
        _rule(t, REFUSE, _match(_meta("l4proto"), "tcp"), {"reject": {"type": "tcp reset"}}),
        _rule(t, REFUSE, {"reject": {"type": "icmpx", "expr": "admin-prohibited"}}),
    ]
    # Anti-spoofing: a VM's link carries only its own outside address, and no IPv6.
    commands += [
        _rule(t, "prerouting_filter", from_veth, _match(_meta("nfproto"), "ipv6"), DROP),
        _rule(
            t, "prerouting_filter", from_veth,
            _match({"concat": [_meta("iifname"), _payload("ip", "saddr")]}, f"@{VM_SOURCES}", "!="),
            DROP,
        ),
    ]  # fmt: skip
    commands.append(_rule(t, "prerouting_nat", {"vmap": {"key": _meta("iifname"), "data": f"@{NAT_CHAINS}"}}))

    commands += [
        _rule(t, "forward", from_veth, _jump(FROM_VM)),
        _rule(t, "forward", _match(_meta("oifname"), veths), _jump(TO_VM)),
    ]
    # A VM's packets are checked one by one (no "established" shortcut), so a
    # policy change holds for connections already open, at the next packet.
    if rules.uplink:
        commands.append(_rule(t, FROM_VM, _match(_meta("oifname"), rules.uplink, "!="), _jump(REFUSE)))
    else:
        commands.append(_rule(t, FROM_VM, _jump(REFUSE)))
    commands += [
        _rule(t, FROM_VM, {"vmap": {"key": _meta("iifname"), "data": f"@{FORWARD_CHAINS}"}}),
        _rule(t, FROM_VM, _jump(REFUSE)),
        _rule(t, TO_VM, ESTABLISHED, ACCEPT),
        _rule(t, TO_VM, _jump(REFUSE)),
    ]
    # The host itself: a VM reaches its DNS and (redirected there by the
    # kernel, never directly) the egress proxy, and nothing else.
    to_host = _match(_payload("ip", "daddr"), host)
    commands += [
        _rule(t, "input", from_veth, _jump(FROM_VM_INPUT)),
        _rule(t, FROM_VM_INPUT, ESTABLISHED, ACCEPT),
        _rule(t, FROM_VM_INPUT, to_host, _match(_payload("udp", "dport"), rules.dns_port), ACCEPT),
        _rule(t, FROM_VM_INPUT, to_host, _match(_payload("tcp", "dport"), rules.dns_port), ACCEPT),
        _rule(
            t, FROM_VM_INPUT, to_host, _match(_payload("tcp", "dport"), rules.proxy_port),
            _match({"ct": {"key": "status"}}, "dnat", "in"), ACCEPT,
        ),
        _rule(t, FROM_VM_INPUT, _jump(REFUSE)),
    ]  # fmt: skip
    # The egress proxy's upstream connections leave through the uplink only.
    marked = _match(_meta("mark"), rules.egress_mark)
    if rules.uplink:
        commands.append(_rule(t, "output", marked, _match(_meta("oifname"), rules.uplink, "!="), _jump(REFUSE)))
        commands.append(
            _rule(
                t, "postrouting_nat", _match(_meta("oifname"), rules.uplink),
                _match(_payload("ip", "saddr"), _prefix(rules.plan.pool)), {"masquerade": None},
            )
        )  # fmt: skip
    else:
        commands.append(_rule(t, "output", marked, _jump(REFUSE)))
    return commands


def delete_host_table(table: str) -> list[Json]:
    return [{"delete": {"table": _table(table)}}]


# ---- per VM


def vm_names(lease: Lease) -> dict[str, str]:
    p = lease.chain_prefix
    return {"cidrs": f"{p}_cidrs", "dns": f"{p}_dns", "out": f"{p}_out", "nat": f"{p}_nat"}


def _vm_rules(table: str, lease: Lease, policy: CompiledPolicy, rules: HostRules, intercepts: bool) -> list[Json]:
    names = vm_names(lease)
    host = str(rules.plan.host_address)
    commands: list[Json] = [{"flush": {"set": {"family": FAMILY, "table": table, "name": names["cidrs"]}}}]
    if policy.cidr_set:
        commands.append(
            {"add": {"element": {
                "family": FAMILY, "table": table, "name": names["cidrs"],
                "elem": [_prefix(network) for network in policy.cidr_set],
            }}}
        )  # fmt: skip
    in_cidrs = _match(_payload("ip", "daddr"), f"@{names['cidrs']}")
    given_by_dns = _match(_payload("ip", "daddr"), f"@{names['dns']}")
    commands += [
        _flush_chain(table, names["out"]),
        _rule(table, names["out"], in_cidrs, ACCEPT),
        _rule(table, names["out"], _jump(REFUSE)),
        _flush_chain(table, names["nat"]),
    ]
    redirects = [
        _rule(
            table, names["nat"], _match(_payload("tcp", "dport"), port), given_by_dns,
            _dnat(host, rules.proxy_port),
        )
        for port, wanted in ((80, policy.proxies_http), (443, policy.proxies_https))
        if wanted or intercepts
    ]  # fmt: skip
    direct = _rule(table, names["nat"], in_cidrs, RETURN)
    # A VM with vaults: web traffic to what its DNS gave out reaches the proxy
    # even where a CIDR would let it go direct, so a service's credential is
    # added whatever else the policy allows (the proxy splices the rest).
    commands += [*redirects, direct] if intercepts else [direct, *redirects]
    return commands


def add_vm(lease: Lease, policy: CompiledPolicy, rules: HostRules, intercepts: bool = False) -> list[Json]:
    """Everything of one VM in the host table, as one transaction; ``intercepts``:
    the VM has vault services (its web traffic to DNS-given addresses goes to the proxy)."""
    t = rules.table
    names = vm_names(lease)
    commands: list[Json] = [
        {"add": {"set": _set(t, names["cidrs"], "interval")}},
        {"add": {"set": _set(t, names["dns"], "timeout")}},
        {"add": _chain(t, names["out"])},
        {"add": _chain(t, names["nat"])},
    ]  # fmt: skip
    commands += _vm_rules(t, lease, policy, rules, intercepts)
    commands += [
        {"add": {"element": {"family": FAMILY, "table": t, "name": VM_SOURCES,
                             "elem": [{"concat": [lease.host_veth, lease.outside_address]}]}}},
        {"add": {"element": {"family": FAMILY, "table": t, "name": FORWARD_CHAINS,
                             "elem": [[lease.host_veth, _jump(names["out"])]]}}},
        {"add": {"element": {"family": FAMILY, "table": t, "name": NAT_CHAINS,
                             "elem": [[lease.host_veth, _jump(names["nat"])]]}}},
    ]  # fmt: skip
    return commands


def update_vm(lease: Lease, policy: CompiledPolicy, rules: HostRules, intercepts: bool = False) -> list[Json]:
    """A running VM's new policy, as one transaction (its DNS set is the daemon's)."""
    return _vm_rules(rules.table, lease, policy, rules, intercepts)


def remove_vm(table: str, lease: Lease, present: Sequence[Json]) -> list[Json]:
    """Delete what of one VM ``present`` (the table as listed) still holds. Map
    elements go first: a chain a verdict map jumps to cannot be deleted."""
    names = vm_names(lease)
    chains = {o["chain"]["name"] for o in present if "chain" in o}
    sets = {o["set"]["name"] for o in present if "set" in o}
    commands: list[Json] = []
    for obj in present:
        for kind in ("map", "set"):
            body = obj.get(kind)
            if body is None or body["name"] not in (VM_SOURCES, FORWARD_CHAINS, NAT_CHAINS):
                continue
            for element in body.get("elem", []):
                key = element[0] if isinstance(element, list) else element
                veth = key["concat"][0] if isinstance(key, dict) and "concat" in key else key
                if veth == lease.host_veth:
                    commands.append(
                        {"delete": {"element": {"family": FAMILY, "table": table, "name": body["name"], "elem": [key]}}}
                    )
    for chain in (names["out"], names["nat"]):
        if chain in chains:
            commands.append({"delete": {"chain": {"family": FAMILY, "table": table, "name": chain}}})
    for set_name in (names["cidrs"], names["dns"]):
        if set_name in sets:
            commands.append({"delete": {"set": {"family": FAMILY, "table": table, "name": set_name}}})
    return commands


def dns_elements(table: str, lease: Lease, timeouts: dict[str, int]) -> list[Json]:
    """Admit ``address -> seconds`` in the VM's DNS set, replacing earlier timeouts."""
    if not timeouts:
        return []
    name = vm_names(lease)["dns"]
    addresses = [{"elem": {"val": address, "timeout": seconds}} for address, seconds in timeouts.items()]
    plain = list(timeouts)
    base = {"family": FAMILY, "table": table, "name": name}
    # add (so it exists), delete, add: the new timeout replaces the old one, atomically.
    return [
        {"add": {"element": {**base, "elem": plain}}},
        {"delete": {"element": {**base, "elem": plain}}},
        {"add": {"element": {**base, "elem": addresses}}},
    ]


def dns_removals(table: str, lease: Lease, addresses: Sequence[str]) -> list[Json]:
    if not addresses:
        return []
    base = {"family": FAMILY, "table": table, "name": vm_names(lease)["dns"]}
    # add first, so deleting an element that timed out meanwhile cannot fail the batch
    return [
        {"add": {"element": {**base, "elem": list(addresses)}}},
        {"delete": {"element": {**base, "elem": list(addresses)}}},
    ]


# ---- inside a VM's namespace


def netns_table(plan: AddressPlan, lease: Lease, dns_port: int) -> list[Json]:
    t = NETNS_TABLE
    guest, gateway, host = plan.guest_address, plan.gateway, str(plan.host_address)
    from_tap = _match(_meta("iifname"), TAP_NAME)
    ipv6 = _match(_meta("nfproto"), "ipv6")
    return [
        {"add": {"table": _table(t)}},
        {"add": _base(t, "prerouting_filter", "filter", "prerouting", -150)},
        {"add": _base(t, "prerouting_nat", "nat", "prerouting", -100)},
        {"add": _base(t, "postrouting_nat", "nat", "postrouting", 100)},
        # IPv6 is refused at the first hop: neighbour discovery is answered (so
        # the refusal is an immediate reset or ICMPv6 error, not a timeout).
        _rule(
            t, "prerouting_filter", from_tap, ipv6,
            _match(_payload("icmpv6", "type"), {"set": ["nd-neighbor-solicit", "nd-neighbor-advert"]}), ACCEPT,
        ),
        _rule(
            t, "prerouting_filter", from_tap, ipv6, _match(_meta("l4proto"), "tcp"), {"reject": {"type": "tcp reset"}}
        ),
        _rule(t, "prerouting_filter", from_tap, ipv6, {"reject": {"type": "icmpx", "expr": "admin-prohibited"}}),
        # The guest is one address; a guest forging another one gets nowhere.
        _rule(t, "prerouting_filter", from_tap, _match(_payload("ip", "saddr"), guest, "!="), DROP),
        # The guest's DNS server is its gateway: served by Kiln's guest DNS on the host.
        _rule(
            t, "prerouting_nat", from_tap, _match(_payload("ip", "daddr"), gateway),
            _match(_meta("l4proto"), {"set": ["tcp", "udp"]}), _match(_payload("th", "dport"), 53),
            _dnat(host, dns_port),
        ),
        # Inbound from the host (shares) to the VM's outside address reaches the guest.
        _rule(
            t, "prerouting_nat", _match(_meta("iifname"), INNER_VETH_NAME),
            _match(_payload("ip", "daddr"), lease.outside_address), _dnat(guest),
        ),
        _rule(
            t, "postrouting_nat", _match(_meta("oifname"), INNER_VETH_NAME),
            _match(_payload("ip", "saddr"), guest), {"snat": {"family": "ip", "addr": lease.outside_address}},
        ),
    ]  # fmt: skip
