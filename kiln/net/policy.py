"""An egress policy as the node enforces it: validated, with its address set computed.

Pure. ``compile_policy`` turns ``EgressRules`` into what the kernel rules and the
egress daemon need; anything it cannot enforce exactly is a ``PolicyError``
(raised before anything on the host changes).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from kiln.node.participant import EgressRules

IPv4Net = ipaddress.IPv4Network
# A DNS name label: letters, digits, hyphens inside, at most 63 bytes.
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
MAX_NAME_LENGTH = 253
MAX_CIDRS = 256
MAX_DOMAINS = 256
# What a policy's web domains are to its user.
WEB_DOMAINS = "the package-manager group"


class PolicyError(ValueError):
    """The policy cannot be enforced as written; ``str()`` says why (fit for a 422)."""


@dataclass(frozen=True)
class CompiledPolicy:
    rules: EgressRules
    # Where the VM may send anything: its CIDRs, less the blocked ranges that
    # a CIDR only covers as part of something larger (sorted, merged).
    cidr_set: tuple[IPv4Net, ...]
    domains: tuple[str, ...]  # normalised: lower case, no trailing dot
    web_domains: tuple[str, ...] = ()  # the same; over HTTP and HTTPS both

    @property
    def proxies_http(self) -> bool:
        return (self.rules.allow_http and bool(self.domains)) or bool(self.web_domains)

    @property
    def proxies_https(self) -> bool:
        return (self.rules.allow_https and bool(self.domains)) or bool(self.web_domains)

    def allows_name(self, name: str) -> bool:
        """Whether the guest DNS answers ``name`` (for any scheme the policy admits)."""
        return self.allows_scheme(name, "http") or self.allows_scheme(name, "https")

    def allows_scheme(self, name: str, scheme: str) -> bool:
        if domain_allowed(name, self.web_domains):
            return True
        wanted = self.rules.allow_http if scheme == "http" else self.rules.allow_https if scheme == "https" else False
        return wanted and domain_allowed(name, self.domains)

    def allows_address(self, address: str) -> bool:
        ip = ipaddress.IPv4Address(address)
        return any(ip in net for net in self.cidr_set)


def normalise_name(name: str) -> str | None:
    """``name`` in canonical form (lower case, no trailing dot), or None if it is no host name."""
    name = name.strip().lower().rstrip(".")
    if not name or len(name) > MAX_NAME_LENGTH:
        return None
    if not all(_LABEL.fullmatch(label) for label in name.split(".")):
        return None
    return name


def domain_allowed(name: str, domains: Iterable[str]) -> bool:
    """Exact names match themselves; ``*.example.com`` matches every name below
    example.com (any depth), not example.com itself."""
    canonical = normalise_name(name)
    if canonical is None:
        return False
    for domain in domains:
        if domain.startswith("*."):
            if canonical.endswith(domain[1:]):
                return True
        elif canonical == domain:
            return True
    return False


def parse_domain(domain: str, where: str = "allowed_domains") -> str:
    wildcard = domain.strip().startswith("*.")
    canonical = normalise_name(domain.strip()[2:] if wildcard else domain)
    if canonical is None:
        raise PolicyError(f"{where}: {domain!r} is not a host name or a '*.domain' wildcard")
    return f"*.{canonical}" if wildcard else canonical


def parse_cidr(cidr: str) -> IPv4Net:
    try:
        network = ipaddress.ip_network(cidr.strip(), strict=False)
    except ValueError as error:
        raise PolicyError(f"allowed_cidrs: {cidr!r} is not an address or a CIDR") from error
    if network.version != 4:
        raise PolicyError(f"allowed_cidrs: {cidr!r}: VM networks are IPv4 only (IPv6 is always refused)")
    return network


def allowed_set(
    cidrs: Sequence[IPv4Net], blocked: Sequence[IPv4Net], never: Sequence[IPv4Net]
) -> tuple[IPv4Net, ...]:
    """The addresses the CIDRs open. A blocked range opens only where a CIDR lies
    inside it (names it explicitly): 0.0.0.0/0 means the public internet, while
    10.1.0.0/16 opens exactly that. ``never`` ranges (Kiln's own: other VMs, the
    host's link address) open for no CIDR."""
    opened: list[IPv4Net] = []
    for cidr in cidrs:
        pieces = [cidr]
        for block in blocked:
            if cidr.subnet_of(block):
                continue  # named explicitly: this block does not cut it
            pieces = [rest for piece in pieces for rest in _minus(piece, block)]
        opened.extend(pieces)
    for block in never:
        opened = [rest for piece in opened for rest in _minus(piece, block)]
    return tuple(ipaddress.collapse_addresses(opened))


def _minus(network: IPv4Net, block: IPv4Net) -> list[IPv4Net]:
    if not network.overlaps(block):
        return [network]
    if network.subnet_of(block):
        return []
    return list(network.address_exclude(block))


def compile_policy(
    rules: EgressRules, *, blocked: Sequence[str], never: Sequence[str]
) -> CompiledPolicy:
    if len(rules.allowed_cidrs) > MAX_CIDRS:
        raise PolicyError(f"allowed_cidrs: at most {MAX_CIDRS} entries")
    if len(rules.allowed_domains) > MAX_DOMAINS:
        raise PolicyError(f"allowed_domains: at most {MAX_DOMAINS} entries")
    if len(rules.web_domains) > MAX_DOMAINS:
        raise PolicyError(f"{WEB_DOMAINS}: at most {MAX_DOMAINS} domains")
    cidrs = [parse_cidr(cidr) for cidr in rules.allowed_cidrs]
    domains = tuple(dict.fromkeys(parse_domain(domain) for domain in rules.allowed_domains))
    web_domains = tuple(dict.fromkeys(parse_domain(domain, WEB_DOMAINS) for domain in rules.web_domains))
    blocked_nets = [IPv4Net(block) for block in blocked]
    never_nets = [IPv4Net(block) for block in never]
    return CompiledPolicy(
        rules=rules,
        cidr_set=allowed_set(cidrs, blocked_nets, never_nets),
        domains=domains,
        web_domains=web_domains,
    )


def is_public_answer(address: str, blocked: Sequence[IPv4Net]) -> bool:
    """A DNS answer the guest may be given: an IPv4 address in no blocked range."""
    try:
        ip = ipaddress.IPv4Address(address)
    except ValueError:
        return False
    return not any(ip in block for block in blocked)


def rules_to_json(rules: EgressRules) -> dict[str, object]:
    return {
        "allowed_cidrs": list(rules.allowed_cidrs),
        "allowed_domains": list(rules.allowed_domains),
        "allow_http": rules.allow_http,
        "allow_https": rules.allow_https,
        "web_domains": list(rules.web_domains),
    }


def rules_from_json(data: dict[str, object]) -> EgressRules:
    cidrs = data.get("allowed_cidrs", [])
    domains = data.get("allowed_domains", [])
    web_domains = data.get("web_domains", [])  # absent in files of older servers
    if not isinstance(cidrs, list) or not isinstance(domains, list) or not isinstance(web_domains, list):
        raise PolicyError("allowed_cidrs, allowed_domains and web_domains must be lists")
    return EgressRules(
        allowed_cidrs=tuple(str(cidr) for cidr in cidrs),
        allowed_domains=tuple(str(domain) for domain in domains),
        allow_http=bool(data.get("allow_http", False)),
        allow_https=bool(data.get("allow_https", False)),
        web_domains=tuple(str(domain) for domain in web_domains),
    )
