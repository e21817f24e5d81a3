"""Checking a domain's records by asking its authoritative servers.

The zone and its NS records are found through a resolver (``KILN_DOMAINS_RESOLVER``,
else the host's); each record is then asked of every authoritative server
directly, without recursion: a resolver's cache (a negative answer cached
before the record existed) never hides a record the zone already serves, and a
secondary that has not caught up yet is seen as such. ACME servers ask the
authoritative servers too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import dns.asyncquery
import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.resolver

from kiln.domains.addresses import split_host_port
from kiln.domains.errors import DnsError
from kiln.domains.records import DnsRecord

Server = tuple[str, int]
QUERY_SECONDS = 5.0


@dataclass(frozen=True)
class Finding:
    record: DnsRecord
    present: bool
    # What the servers that lack it answer instead (for last_error), one line.
    seen: str = ""


class RecordChecker:
    def __init__(self, resolver: str = "", timeout: float = QUERY_SECONDS) -> None:
        self._resolver_setting = resolver
        self._timeout = timeout

    def _resolver(self) -> dns.asyncresolver.Resolver:
        if not self._resolver_setting:
            resolver = dns.asyncresolver.Resolver()
        else:
            host, port = split_host_port(self._resolver_setting)
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = [host]
            resolver.port = port
        resolver.lifetime = self._timeout
        return resolver

    async def authoritative_servers(self, domain: str) -> list[Server]:
        """The addresses of the NS of the zone holding ``domain`` (port 53)."""
        resolver = self._resolver()
        try:
            zone = await dns.asyncresolver.zone_for_name(domain, resolver=resolver, lifetime=self._timeout)
            names = [str(rdata.target) for rdata in await resolver.resolve(zone, dns.rdatatype.NS)]
            servers: list[Server] = []
            for name in names:
                for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                    try:
                        servers += [(str(rdata), 53) for rdata in await resolver.resolve(name, rdtype)]
                    except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
                        continue
        except dns.exception.DNSException as error:
            raise DnsError(f"cannot find the authoritative DNS servers of {domain}: {error}") from error
        if not servers:
            raise DnsError(f"the NS records of {zone.to_text(omit_final_dot=True)} name no server with an address")
        return sorted(set(servers))

    async def check(self, domain: str, records: Sequence[DnsRecord], also: Sequence[Server] = ()) -> list[Finding]:
        """Each record of ``domain``: served by every authoritative server (and
        ``also``, a provider's primary), or not, with what was seen instead."""
        if not records:
            return []
        try:
            servers = await self.authoritative_servers(domain)
        except DnsError:
            if not also:
                raise
            servers = []
        servers = sorted(set(servers) | set(also))
        findings = []
        for record in records:
            missing = []
            for server in servers:
                values = await self._ask(server, record)
                if record.value.lower() not in {value.lower() for value in values}:
                    shown = ", ".join(sorted(values)) or "nothing"
                    missing.append(f"{server[0]} answers {shown}")
            findings.append(Finding(record, not missing, "; ".join(missing)))
        return findings

    async def _ask(self, server: Server, record: DnsRecord) -> list[str]:
        query = dns.message.make_query(record.name, record.type)
        query.flags &= ~dns.flags.RD
        try:
            response = await dns.asyncquery.udp(query, server[0], port=server[1], timeout=self._timeout)
            if response.flags & dns.flags.TC:
                response = await dns.asyncquery.tcp(query, server[0], port=server[1], timeout=self._timeout)
        except (OSError, dns.exception.DNSException) as error:
            return [f"(no answer: {error or type(error).__name__})"]
        if response.rcode() != dns.rcode.NOERROR:
            return [f"({dns.rcode.to_text(response.rcode())})"]
        wanted = dns.rdatatype.from_text(record.type)
        values: list[str] = []
        for rrset in response.answer:
            if rrset.rdtype != wanted:
                continue
            for rdata in rrset:
                if wanted == dns.rdatatype.TXT:
                    values.append(b"".join(rdata.strings).decode(errors="replace"))
                elif wanted == dns.rdatatype.CNAME:
                    values.append(rdata.target.to_text(omit_final_dot=True))
                else:
                    values.append(rdata.to_text())
        return values


def missing_summary(findings: Sequence[Finding]) -> str:
    """``last_error`` for records that are not there yet."""
    lines = [
        f"{finding.record.type} {finding.record.name} = {finding.record.value} is not served yet ({finding.seen})"
        for finding in findings
        if not finding.present
    ]
    return "; ".join(lines)
