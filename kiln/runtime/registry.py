"""Where a registry pull may connect, and the proxy that holds it to that.

A pull (``kiln.runtime.oci.pull``, with ``skopeo``) must never reach the host's
own services, the cloud metadata address or the private network, whatever the
registry's name resolves to and wherever the registry redirects (blobs usually
come from a CDN on another host). So skopeo gets no network of its own: its
``HTTPS_PROXY`` is a ``PinnedProxy`` that Kiln runs on the loopback for the one
pull. For each ``CONNECT host:port`` the proxy resolves the name once, checks
every address it got (all must be public: ``is_public``), and opens the tunnel
to one of exactly those addresses, so a name that resolves differently a moment
later (DNS rebinding) changes nothing. Only the ports the pull needs (443 and
the registry's own) are tunnelled; a plain-HTTP proxy request is refused.

What the proxy cannot see: Go's HTTP client never proxies requests to the
literal names ``localhost`` or loopback IP addresses. A registry Kiln pulls from
is checked the same way before skopeo starts (``checked_addresses``), so only a
redirect from an allowed registry to a literal loopback address could bypass
the proxy; the operator's allow-list of registries is trusted not to do that.

Stdlib only; nothing here knows about users or HTTP routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Collection
from typing import Self

Resolver = Callable[[str, int], Awaitable[list[str]]]
AddressCheck = Callable[[str], bool]

MAX_REQUEST_HEAD_BYTES = 8192
REQUEST_HEAD_TIMEOUT_SECONDS = 30.0
PIPE_CHUNK_BYTES = 64 * 1024


class AddressRefused(OSError):
    """A name resolves to an address a pull may not reach; ``str()`` says which."""


def is_public(address: str) -> bool:
    """True for a globally routable unicast address: not loopback, link-local,
    private, shared (CGNAT), multicast, reserved or unspecified (IPv4 inside
    IPv6 judged as IPv4)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


async def system_resolver(host: str, port: int) -> list[str]:
    """Every address the host's resolver gives for ``host`` (TCP), in its order."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


async def checked_addresses(
    host: str, port: int, resolver: Resolver = system_resolver, allow: AddressCheck = is_public
) -> list[str]:
    """``host``'s addresses, resolved once, every one of them allowed;
    ``AddressRefused`` if any is not (one bad answer taints the name), OSError
    if the name does not resolve."""
    addresses = await resolver(host, port)
    if not addresses:
        raise OSError(f"{host} has no address")
    refused = [address for address in addresses if not allow(address)]
    if refused:
        raise AddressRefused(
            f"{host} resolves to {refused[0]}, a loopback, link-local or private address "
            f"that pulls never reach"
        )
    return addresses


async def open_checked(
    host: str,
    port: int,
    timeout: float,
    resolver: Resolver = system_resolver,
    allow: AddressCheck = is_public,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP connection to one of ``host``'s checked addresses (tried in order)."""
    last_error: OSError | None = None
    for address in await checked_addresses(host, port, resolver, allow):
        try:
            return await asyncio.wait_for(asyncio.open_connection(address, port), timeout)
        except OSError as error:  # TimeoutError included
            last_error = error
    assert last_error is not None
    raise last_error


class PinnedProxy:
    """An HTTP CONNECT proxy on 127.0.0.1 that tunnels only to checked public
    addresses (see the module's docstring). ``refusals`` keeps why it refused,
    for the pull's error message."""

    def __init__(
        self,
        ports: Collection[int],
        connect_timeout: float = 10.0,
        resolver: Resolver = system_resolver,
        allow: AddressCheck = is_public,
    ) -> None:
        self._ports = frozenset(ports)
        self._connect_timeout = connect_timeout
        self._resolver = resolver
        self._allow = allow
        self._server: asyncio.Server | None = None
        self._tunnels: set[asyncio.Task[None]] = set()
        self.refusals: list[str] = []

    async def start(self) -> str:
        """Listen; returns the proxy's URL (for ``HTTPS_PROXY``)."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tunnels):
            task.cancel()
        await asyncio.gather(*self._tunnels, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tunnels.add(task)
        try:
            await self._tunnel(reader, writer)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            pass  # the client or the upstream went away: nothing to tell anyone
        finally:
            self._tunnels.discard(task)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _tunnel(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_HEAD_TIMEOUT_SECONDS)
        if len(head) > MAX_REQUEST_HEAD_BYTES:
            return await _answer(writer, 431, "Request Header Fields Too Large")
        method, _, rest = head.split(b"\r\n", 1)[0].decode("latin-1").partition(" ")
        target = rest.rpartition(" ")[0]
        if method != "CONNECT":
            return await _answer(writer, 405, "Method Not Allowed")
        host, _, port_text = target.rpartition(":")
        host = host.strip("[]")
        if not host or not port_text.isdigit() or int(port_text) not in self._ports:
            self.refusals.append(f"a tunnel to {target} (port not used by registries)")
            return await _answer(writer, 403, "Forbidden")
        try:
            upstream_reader, upstream_writer = await open_checked(
                host, int(port_text), self._connect_timeout, self._resolver, self._allow
            )
        except AddressRefused as error:
            self.refusals.append(str(error))
            return await _answer(writer, 403, "Forbidden")
        except OSError:
            return await _answer(writer, 502, "Bad Gateway")
        try:
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()
            await asyncio.gather(
                _pipe(reader, upstream_writer), _pipe(upstream_reader, writer)
            )
        finally:
            upstream_writer.close()


async def _answer(writer: asyncio.StreamWriter, status: int, reason: str) -> None:
    writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    try:
        while chunk := await source.read(PIPE_CHUNK_BYTES):
            sink.write(chunk)
            await sink.drain()
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            if sink.can_write_eof():
                sink.write_eof()
