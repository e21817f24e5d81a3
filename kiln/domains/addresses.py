"""``host[:port]`` settings and credentials, and which addresses Kiln may send DNS to."""

from __future__ import annotations

import asyncio
import ipaddress
import socket

from kiln.domains.errors import DnsError

DNS_PORT = 53


def split_host_port(text: str, default_port: int = DNS_PORT) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]:port`` or a bare IPv6 address; ``ValueError`` otherwise."""
    text = text.strip()
    if not text:
        raise ValueError("must name a host")
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest.removeprefix(":") if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise ValueError("must be host, host:port or [address]:port")
    elif text.count(":") > 1:
        host, port_text = text, ""  # a bare IPv6 address
    else:
        host, _, port_text = text.partition(":")
    if not host:
        raise ValueError("must name a host")
    port = default_port
    if port_text:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ValueError("the port must be 1-65535")
        port = int(port_text)
    return host, port


def is_public(address: str) -> bool:
    return ipaddress.ip_address(address).is_global


async def resolve_host(host: str, *, allow_private: bool) -> str:
    """An address of ``host`` (an address as it is), refusing loopback, private and
    link-local ones unless ``allow_private`` (the operator's own DNS may live there)."""
    try:
        ipaddress.ip_address(host)
        addresses = [host]
    except ValueError:
        try:
            found = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except OSError as error:
            raise DnsError(f"cannot resolve the DNS server {host}: {error}") from error
        addresses = [str(entry[4][0]) for entry in found]
    for address in addresses:
        if allow_private or is_public(address):
            return address
    raise DnsError(
        f"the DNS server {host} is on a private, loopback or link-local address ({addresses[0]}); "
        "this server sends DNS updates to public addresses only (KILN_DOMAINS_ALLOW_PRIVATE_DNS)"
    )
