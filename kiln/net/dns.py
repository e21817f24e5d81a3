"""The guest DNS: answers a VM's allowed names, NXDOMAIN for every other name.

A name the policy does not allow is never sent upstream, so nothing leaves
the host through queries. An allowed name is resolved through
``KILN_DNS_UPSTREAM`` (A records, CNAME chains followed and flattened onto the
asked name); addresses in blocked ranges are dropped (no rebinding an allowed
name onto internal hosts); the rest is recorded in the ``AnswerBook`` (and so in
the VM's nftables set) before the answer is sent. VM networks are IPv4 only:
AAAA and other types of an allowed name get an empty NOERROR answer.

Messages are dnspython's. Served over UDP and TCP on the host's link address.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.rrset

from kiln.net.answers import AnswerBook
from kiln.net.policy import is_public_answer, normalise_name
from kiln.net.registry import VmRegistry

log = logging.getLogger(__name__)

UPSTREAM_TIMEOUT_SECONDS = 3.0
MAX_ANSWER_ADDRESSES = 16
MIN_TTL_SECONDS = 5
TCP_IDLE_SECONDS = 10.0
TCP_MAX_QUERIES = 64
MAX_MESSAGE_BYTES = 4096


@dataclass(frozen=True)
class Upstream:
    address: str
    port: int = 53

    @classmethod
    def parse(cls, text: str) -> Upstream:
        """``IP[:PORT]`` (``[v6]:PORT`` for IPv6); empty: the host's first resolver."""
        text = text.strip()
        if not text:
            nameservers = dns.resolver.Resolver().nameservers
            if not nameservers:
                raise ValueError("no KILN_DNS_UPSTREAM and no resolver in /etc/resolv.conf")
            return cls(str(nameservers[0]))
        if text.startswith("["):
            host, _, port = text[1:].partition("]")
            return cls(str(ipaddress.ip_address(host)), int(port.lstrip(":") or 53))
        host, _, port = text.partition(":") if text.count(":") == 1 else (text, "", "")
        return cls(str(ipaddress.ip_address(host)), int(port or 53))


@dataclass(frozen=True)
class Resolved:
    rcode: dns.rcode.Rcode
    addresses: tuple[str, ...] = ()
    ttl: int = 0


Resolver = Callable[[str], Awaitable[Resolved]]


def addresses_of(response: dns.message.Message, name: dns.name.Name) -> tuple[tuple[str, ...], int]:
    """The A addresses of ``name`` in an answer section, through its CNAME
    chain, and the smallest TTL on the way."""
    target, ttl, seen = name, None, set()
    addresses: list[str] = []
    for _ in range(16):  # a chain longer than this is broken or hostile
        if target in seen:
            break
        seen.add(target)
        cname = _rrset(response, target, dns.rdatatype.CNAME)
        a = _rrset(response, target, dns.rdatatype.A)
        if a is not None:
            addresses = [rdata.address for rdata in a]
            ttl = a.ttl if ttl is None else min(ttl, a.ttl)
            break
        if cname is None:
            break
        ttl = cname.ttl if ttl is None else min(ttl, cname.ttl)
        target = cname[0].target
    return tuple(addresses), ttl or 0


def _rrset(response: dns.message.Message, name: dns.name.Name, rdtype: int) -> dns.rrset.RRset | None:
    for rrset in response.answer:
        if rrset.name == name and rrset.rdclass == dns.rdataclass.IN and rrset.rdtype == rdtype:
            return rrset
    return None


def upstream_resolver(upstream: Upstream) -> Resolver:
    async def resolve(name: str) -> Resolved:
        query = dns.message.make_query(name, dns.rdatatype.A)
        try:
            response, _ = await dns.asyncquery.udp_with_fallback(
                query, upstream.address, timeout=UPSTREAM_TIMEOUT_SECONDS, port=upstream.port
            )
        except (dns.exception.DNSException, OSError) as error:
            log.warning("upstream %s failed for %s: %s", upstream.address, name, error)
            return Resolved(dns.rcode.SERVFAIL)
        if response.rcode() != dns.rcode.NOERROR:
            return Resolved(response.rcode())
        addresses, ttl = addresses_of(response, dns.name.from_text(name))
        return Resolved(dns.rcode.NOERROR, addresses, ttl)

    return resolve


class GuestDns:
    def __init__(
        self,
        registry: VmRegistry,
        book: AnswerBook,
        resolve: Resolver,
        *,
        blocked: list[ipaddress.IPv4Network],
        max_ttl: int,
        grace_seconds: int,
    ) -> None:
        self.registry = registry
        self.book = book
        self.resolve = resolve
        self.blocked = blocked
        self.max_ttl = max_ttl
        self.grace_seconds = grace_seconds

    async def answer(self, wire: bytes, source: str) -> bytes | None:
        """The response to one query from ``source``; None to stay silent (not DNS)."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        if query.flags & dns.flags.QR:
            return None  # a response, not a query: never answer those
        response = dns.message.make_response(query)
        response.flags |= dns.flags.RA
        response.set_rcode(await self._fill(query, response, source))
        return response.to_wire()

    async def _fill(
        self, query: dns.message.Message, response: dns.message.Message, source: str
    ) -> dns.rcode.Rcode:
        vm = self.registry.by_address(source)
        if vm is None:
            return dns.rcode.REFUSED
        if query.opcode() != dns.opcode.QUERY:
            return dns.rcode.NOTIMP
        if len(query.question) != 1:
            return dns.rcode.FORMERR
        question = query.question[0]
        name = normalise_name(question.name.to_text(omit_final_dot=True))
        if question.rdclass != dns.rdataclass.IN or name is None or not vm.allows_name(name):
            return dns.rcode.NXDOMAIN
        if question.rdtype != dns.rdatatype.A:
            return dns.rcode.NOERROR  # the name exists; this VM's network has only IPv4
        resolved = await self.resolve(name)
        if resolved.rcode != dns.rcode.NOERROR:
            return resolved.rcode
        addresses = [a for a in resolved.addresses if is_public_answer(a, self.blocked)][:MAX_ANSWER_ADDRESSES]
        if len(addresses) < len(resolved.addresses):
            log.info("VM %s: %s answers in blocked ranges dropped", vm.vm_id, name)
        if not addresses:
            return dns.rcode.NOERROR
        ttl = max(MIN_TTL_SECONDS, min(resolved.ttl, self.max_ttl))
        await self.book.give(vm.vm_id, vm.lease, name, addresses, ttl + self.grace_seconds)
        response.answer.append(
            dns.rrset.from_text_list(question.name, ttl, dns.rdataclass.IN, dns.rdatatype.A, addresses)
        )
        return dns.rcode.NOERROR

    # ---- transports

    def udp_protocol(self) -> asyncio.DatagramProtocol:
        return _UdpServer(self)

    async def serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        source = writer.get_extra_info("peername")[0]
        try:
            for _ in range(TCP_MAX_QUERIES):
                header = await asyncio.wait_for(reader.readexactly(2), TCP_IDLE_SECONDS)
                (length,) = struct.unpack("!H", header)
                wire = await asyncio.wait_for(reader.readexactly(length), TCP_IDLE_SECONDS)
                reply = await self.answer(wire, source)
                if reply is None:
                    break
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


class _UdpServer(asyncio.DatagramProtocol):
    def __init__(self, dns_server: GuestDns) -> None:
        self.dns = dns_server
        self.transport: asyncio.DatagramTransport | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if len(data) > MAX_MESSAGE_BYTES:
            return
        task = asyncio.create_task(self._reply(data, addr))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _reply(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            reply = await self.dns.answer(data, addr[0])
        except Exception:  # one bad query must not stop the server
            log.exception("guest DNS query from %s failed", addr[0])
            return
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)
