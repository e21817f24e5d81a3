"""The DNS records a custom domain needs: where it points, and the ACME challenge."""

from __future__ import annotations

import ipaddress
from dataclasses import asdict, dataclass
from typing import Any

from kiln.domains.names import challenge_name

ROUTE = "route"  # the domain points at the share router
CHALLENGE = "acme-challenge"  # the ACME DNS-01 challenge (TXT)
DEFAULT_TTL = 60


@dataclass(frozen=True)
class DnsRecord:
    type: str  # A, AAAA, CNAME or TXT
    name: str  # fully qualified, no trailing dot
    value: str  # an address, a target name, or the TXT text (unquoted)
    purpose: str  # ROUTE or CHALLENGE
    ttl: int = DEFAULT_TTL

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DnsRecord:
        return cls(
            type=str(data["type"]),
            name=str(data["name"]),
            value=str(data["value"]),
            purpose=str(data["purpose"]),
            ttl=int(data.get("ttl", DEFAULT_TTL)),
        )


def route_record(domain: str, public_address: str) -> DnsRecord | None:
    """The domain's A, AAAA or CNAME record to the router's public address
    (an address or a host name); None when the server names none."""
    target = public_address.strip().removesuffix(".")
    if not target:
        return None
    try:
        address = ipaddress.ip_address(target)
    except ValueError:
        return DnsRecord("CNAME", domain, target.lower(), ROUTE)
    return DnsRecord("A" if address.version == 4 else "AAAA", domain, str(address), ROUTE)


def challenge_record(domain: str, value: str) -> DnsRecord:
    return DnsRecord("TXT", challenge_name(domain), value, CHALLENGE)
