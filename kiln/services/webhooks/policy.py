"""What an endpoint may be: its URL, where it may point, its patterns.

- **Design: public addresses only, checked at every send.** *What:* a URL's
  host is resolved when the endpoint is made or changed and again before each
  attempt; any loopback, private, link-local, multicast or reserved address
  refuses it (unless the operator sets ``KILN_WEBHOOK_ALLOW_PRIVATE``, as tests
  do to reach their own receiver). *Why:* the server would otherwise make
  requests into its own host or network for whoever makes an endpoint (the
  metadata service, the API itself); checking again at send time catches a
  name that resolved elsewhere later.
"""

from __future__ import annotations

import asyncio
import fnmatch
import ipaddress
import re
import socket
from urllib.parse import urlsplit

from kiln.services.errors import FieldProblem, InvalidRequest
from kiln.services.events.catalog import GROUP_OF

PATTERN = re.compile(r"^[a-z0-9_.*]+$")
# Events of the webhook group are not fanned out by pattern: a test event goes
# to its one endpoint, and endpoint changes must not feed themselves. Nor are
# api.call records: one per request would flood a "*" endpoint (the changes a
# call made have events of their own).
UNROUTED_GROUPS = frozenset({"webhook", "api"})


class UnsafeAddress(Exception):
    """The URL's host resolves to an address webhooks may not reach."""


def routable_types() -> list[str]:
    return sorted(kind for kind, group in GROUP_OF.items() if group not in UNROUTED_GROUPS)


def check_patterns(patterns: list[str] | None, field: str = "event_patterns") -> list[str]:
    if patterns is None:
        return ["*"]
    if not patterns:
        raise InvalidRequest.single((field,), "name at least one pattern (or leave the field out for every event)")
    problems = []
    for index, pattern in enumerate(patterns):
        if not PATTERN.match(pattern):
            problems.append(FieldProblem((field, index), "letters, digits, '_', '.' and '*' only"))
        elif not any(fnmatch.fnmatchcase(kind, pattern) for kind in routable_types()):
            problems.append(FieldProblem((field, index), f"{pattern!r} matches no event type (GET /v1/audit/catalog)"))
    if problems:
        raise InvalidRequest(problems)
    return list(dict.fromkeys(patterns))


def matches(patterns: list[str], event_type: str) -> bool:
    return any(fnmatch.fnmatchcase(event_type, pattern) for pattern in patterns)


def check_url_syntax(url: str, field: str = "url") -> tuple[str, int]:
    """(host, port) of an http(s) URL without credentials; 422 otherwise."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise InvalidRequest.single((field,), f"not a URL: {error}") from error
    if parts.scheme not in ("http", "https"):
        raise InvalidRequest.single((field,), "must be an http:// or https:// URL")
    if not parts.hostname:
        raise InvalidRequest.single((field,), "must name a host")
    if parts.username is not None or parts.password is not None:
        # The URL is shown in every listing; credentials in it would be too.
        raise InvalidRequest.single((field,), "must not carry credentials (user:password@)")
    if any(ch.isspace() for ch in url):
        raise InvalidRequest.single((field,), "must not contain whitespace")
    return parts.hostname, port or (443 if parts.scheme == "https" else 80)


def address_allowed(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


async def check_destination(url: str, allow_private: bool) -> None:
    """``UnsafeAddress`` unless every address the host resolves to may be reached."""
    host, port = check_url_syntax(url)
    if allow_private:
        return
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as error:
        raise UnsafeAddress(f"{host} does not resolve: {error}") from error
    addresses = sorted({str(info[4][0]) for info in infos})
    refused = [address for address in addresses if not address_allowed(address)]
    if refused or not addresses:
        raise UnsafeAddress(
            f"{host} resolves to {', '.join(refused or addresses)}: loopback, private, link-local and reserved "
            "addresses are refused (the operator may allow them with KILN_WEBHOOK_ALLOW_PRIVATE)"
        )


async def check_url(url: str, allow_private: bool, field: str = "url") -> None:
    """The 422 form of the checks, for create and update."""
    check_url_syntax(url, field)
    try:
        await check_destination(url, allow_private)
    except UnsafeAddress as error:
        raise InvalidRequest.single((field,), str(error)) from error
