"""The transparent egress proxy: HTTP (Host) and HTTPS (SNI) for allowed domains.

The kernel redirects a VM's TCP 80/443 to an address its guest DNS gave it to
this listener (Kiln's table, ``vm<n>_nat``). For each connection:

1. the original destination (``SO_ORIGINAL_DST``) and the VM (by source address);
2. the request head (HTTP) or the whole ClientHello (HTTPS), bounded in size and time;
3. admitted only if the VM's policy allows that name for that scheme and the
   guest DNS gave that VM that very address for that name;
4. a connection to the original destination, marked so that it may only
   leave through the uplink, gets the bytes read so far; then both ways are
   spliced until either side ends.

A name the VM's vaults cover (and the guest DNS gave it at that address) is
not spliced but intercepted (``kiln.proxy.intercept``), whatever the policy.
For such VMs the kernel also sends web traffic to CIDR-allowed addresses here
(``kiln.net.ruleset``): it is spliced whatever the name.

A refusal is a TCP reset (SO_LINGER 0), never a clean close that looks like
an answer. Connections are kept per VM, so a policy change closes those it
no longer admits.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from dataclasses import dataclass, field

from kiln.net.answers import AnswerBook
from kiln.net.registry import KnownVm, VmRegistry
from kiln.proxy.http_host import NotHttp, request_host
from kiln.proxy.intercept import Interceptor
from kiln.proxy.sni import NeedMore, NotClientHello, parse_client_hello
from kiln.proxy.streams import reset
from kiln.proxy.upstream import open_marked

log = logging.getLogger(__name__)

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
SCHEMES = {80: "http", 443: "https"}
HEAD_TIMEOUT_SECONDS = 10.0
READ_BYTES = 64 * 1024
MAX_HEAD_BYTES = 96 * 1024


def original_destination(sock: socket.socket) -> tuple[str, int] | None:
    try:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    except OSError:
        return None
    port, packed = struct.unpack_from("!H4s", raw, 2)
    return socket.inet_ntoa(packed), port


@dataclass(eq=False)
class Spliced:
    vm_id: str
    name: str
    scheme: str
    address: str
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    intercepted: bool = False  # by a vault service (kept while one covers the name)

    def close(self) -> None:
        for writer in self.writers:
            reset(writer)


class TransparentProxy:
    def __init__(
        self,
        registry: VmRegistry,
        book: AnswerBook,
        *,
        host_address: str,
        mark: int,
        interceptor: Interceptor | None = None,
    ) -> None:
        self.registry = registry
        self.book = book
        self.host_address = host_address
        self.mark = mark
        self.interceptor = interceptor
        self.live: dict[str, set[Spliced]] = {}

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._handle(reader, writer)
        except Exception:  # one connection's trouble must not stop the server
            log.exception("egress proxy connection failed")
            reset(writer)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        source = writer.get_extra_info("peername")[0]
        destination = original_destination(writer.get_extra_info("socket"))
        vm = self.registry.by_address(source)
        if vm is None or destination is None or destination[0] == self.host_address:
            reset(writer)
            return
        address, port = destination
        scheme = SCHEMES.get(port)
        if scheme is None:
            reset(writer)
            return
        try:
            head, name = await asyncio.wait_for(self._read_name(reader, scheme), HEAD_TIMEOUT_SECONDS)
        except (NotHttp, NotClientHello, TimeoutError, ConnectionError, asyncio.IncompleteReadError) as why:
            log.info("VM %s -> %s:%d refused: %s", vm.vm_id, address, port, why or type(why).__name__)
            reset(writer)
            return
        if self.intercepts(vm, name, address):
            await self._intercept(vm, name, scheme, (address, port), head, reader, writer)
            return
        if not self.admits(vm, name, scheme, address):
            log.info("VM %s -> %s (%s) %s refused by its policy", vm.vm_id, name, address, scheme)
            reset(writer)
            return
        upstream = await self._connect(address, port)
        if upstream is None:
            reset(writer)
            return
        up_reader, up_writer = upstream
        connection = Spliced(vm.vm_id, name, scheme, address, [writer, up_writer])
        self.live.setdefault(vm.vm_id, set()).add(connection)
        try:
            up_writer.write(head)
            await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))
        finally:
            self.live.get(vm.vm_id, set()).discard(connection)
            for side in (writer, up_writer):
                side.close()

    def admits(self, vm: KnownVm, name: str, scheme: str, address: str) -> bool:
        if vm.policy.allows_address(address):
            return True  # an allowed CIDR admits anything (here only for VMs with vaults)
        return vm.policy.allows_scheme(name, scheme) and self.book.given(vm.vm_id, name, address)

    def intercepts(self, vm: KnownVm, name: str, address: str) -> bool:
        return (
            self.interceptor is not None
            and vm.injection_for(name) is not None
            and self.book.given(vm.vm_id, name, address)
        )

    def recheck(self, vm_id: str) -> int:
        """Close the VM's connections its current policy and vaults (or their absence) no longer admit."""
        vm = self.registry.by_id(vm_id)
        closed = 0
        for connection in list(self.live.get(vm_id, ())):
            if connection.intercepted:
                kept = vm is not None and vm.injection_for(connection.name) is not None
            else:
                kept = vm is not None and self.admits(vm, connection.name, connection.scheme, connection.address)
            if not kept:
                connection.close()
                closed += 1
        return closed

    async def _intercept(
        self,
        vm: KnownVm,
        name: str,
        scheme: str,
        destination: tuple[str, int],
        head: bytes,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        assert self.interceptor is not None
        connection = Spliced(vm.vm_id, name, scheme, destination[0], [writer], intercepted=True)
        self.live.setdefault(vm.vm_id, set()).add(connection)
        try:
            await self.interceptor.serve(vm, name, scheme, destination, head, reader, writer)
        finally:
            self.live.get(vm.vm_id, set()).discard(connection)
            writer.close()

    async def _read_name(self, reader: asyncio.StreamReader, scheme: str) -> tuple[bytes, str]:
        data = b""
        while True:
            chunk = await reader.read(READ_BYTES)
            if not chunk:
                raise ConnectionError("closed before its request")
            data += chunk
            if len(data) > MAX_HEAD_BYTES:
                raise NotHttp("request head too large") if scheme == "http" else NotClientHello("too large")
            try:
                if scheme == "http":
                    return data, request_host(data)
                hello = parse_client_hello(data)
            except NeedMore:
                continue
            if hello.server_name is None:
                raise NotClientHello("no server name")
            return data, hello.server_name

    async def _connect(self, address: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        try:
            return await open_marked(address, port, self.mark)
        except (OSError, TimeoutError) as error:
            log.info("upstream %s:%d: %s", address, port, error)
            return None

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while chunk := await reader.read(READ_BYTES):
                writer.write(chunk)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError):
            reset(writer)
