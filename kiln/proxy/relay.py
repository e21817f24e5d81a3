"""HTTP/1.1 between a guest and a service, with a vault's credential added to each request.

Both sides are parsed by h11 (the guest's as a server, the service's as a
client); bodies stream through in pieces, never whole. For each request:

1. its ``Host`` must be the name the connection was admitted for (the SNI of
   an intercepted TLS connection, the first request's Host over HTTP); else 421;
2. the credential of the VM's service for that name *now* (``current``): a
   rotated value goes into the very next request, an unbound host ends the
   connection (503), so that the guest's next connection meets its policy;
3. the configured header is set (every header of that name the guest sent is
   dropped), ``Accept-Encoding: identity`` asked for (so the answer can be
   scrubbed), an ``Expect: 100-continue`` answered here;
4. the service is connected on first use (``connect``; a failure is a 502
   saying why, and the credential never left);
5. the answer goes back with every occurrence of the value masked
   (``kiln.proxy.scrub``), and the call is recorded (``record``).

A ``101 Switching Protocols`` answer (WebSocket) hands both connections to a
plain splice, unscrubbed after the handshake.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import h11

from kiln.proxy.scrub import Scrubber, scrub
from kiln.proxy.streams import ByteStream
from kiln.proxy.upstream import UpstreamError
from kiln.vault.auth import header_value
from kiln.vault.binding import Injection
from kiln.vault.hosts import canonical_name

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 64 * 1024
IDLE_SECONDS = 120.0  # between requests on a kept-alive connection
READ_SECONDS = 300.0  # silence within one exchange (a slow model may think long)


@dataclass(frozen=True)
class Credential:
    injection: Injection
    value: bytes


Current = Callable[[], Credential | None]
Record = Callable[[Injection, str, str, int | None, str | None], None]


class Relay:
    def __init__(
        self,
        client: ByteStream,
        name: str,
        *,
        connect: Callable[[], Awaitable[ByteStream]],
        current: Current,
        record: Record,
    ) -> None:
        self.client = client
        self.name = name
        self.connect = connect
        self.current = current
        self.record = record
        self.guest = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        self.service: ByteStream | None = None
        self.upstream: h11.Connection | None = None

    async def run(self, already_read: bytes = b"") -> None:
        """Serve requests until either side ends the connection."""
        if already_read:
            self.guest.receive_data(already_read)
        try:
            while await self._exchange():
                self.guest.start_next_cycle()
        except (h11.ProtocolError, ConnectionError, OSError, TimeoutError) as error:
            # Only the kind: a protocol error's text may quote a header.
            log.info("intercepted %s: connection ended: %s", self.name, type(error).__name__)
            self.client.abort()
            if self.service is not None:
                self.service.abort()
            return
        if self.service is not None:
            await self.service.aclose()
        await self.client.aclose()

    async def _exchange(self) -> bool:
        """One request and its answer; False when the connection is done."""
        event = await _next(self.guest, self.client, IDLE_SECONDS)
        if not isinstance(event, h11.Request):
            return False
        method, target = event.method.decode("ascii", "replace"), event.target.decode("ascii", "replace")
        hosts = [value for header, value in event.headers if header == b"host"]
        if len(hosts) != 1 or _host_of(hosts[0]) != self.name:
            await self._refuse(421, f"this connection is for {self.name}")
            return False
        credential = self.current()
        if credential is None:
            await self._refuse(503, f"the VM's vaults have no usable credential for {self.name} now; connect again")
            return False
        injection, value = credential.injection, credential.value
        if self.service is None:
            try:
                self.service = await self.connect()
            except UpstreamError as error:
                self.record(injection, method, target, None, str(error))
                log.warning("VM call to %s not sent: %s", self.name, error)
                await self._refuse(502, str(error))
                return False
            self.upstream = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
        assert self.upstream is not None
        headers = _injected(event, injection, value)
        await self._send_up(h11.Request(method=event.method, target=event.target, headers=headers))
        if self.guest.they_are_waiting_for_100_continue:
            await self._send_guest(h11.InformationalResponse(status_code=100, headers=[]))
        while not isinstance(body := await _next(self.guest, self.client, READ_SECONDS), h11.EndOfMessage):
            if not isinstance(body, h11.Data):
                return False
            await self._send_up(body)
        await self._send_up(body)
        status = await self._answer(value)
        self.record(injection, method, target, status, None)
        if status == 101:
            return False
        if self.guest.our_state is h11.MUST_CLOSE or self.guest.their_state is h11.MUST_CLOSE:
            return False
        if self.upstream.our_state is h11.DONE and self.upstream.their_state is h11.DONE:
            self.upstream.start_next_cycle()
        else:
            self.service.abort()
            self.service = self.upstream = None
        return True

    async def _answer(self, value: bytes) -> int:
        """The service's answer to the guest, the value masked; its status."""
        assert self.service is not None and self.upstream is not None
        scrubber = Scrubber(value)
        status = 0
        while True:
            event = await _next(self.upstream, self.service, READ_SECONDS)
            if isinstance(event, h11.InformationalResponse):
                if event.status_code == 101:
                    await self._send_guest(_scrubbed_head(event, value))
                    await self._switch()
                    return 101
                if event.status_code != 100:  # ours went already
                    await self._send_guest(_scrubbed_head(event, value))
            elif isinstance(event, h11.Response):
                status = event.status_code
                await self._send_guest(_scrubbed_head(event, value))
            elif isinstance(event, h11.Data):
                if data := scrubber.feed(bytes(event.data)):
                    await self._send_guest(h11.Data(data=data))
            elif isinstance(event, h11.EndOfMessage):
                if tail := scrubber.flush():
                    await self._send_guest(h11.Data(data=tail))
                trailers = [(n, scrub(bytes(v), value)) for n, v in event.headers]
                await self._send_guest(h11.EndOfMessage(headers=trailers))
                return status
            else:
                raise ConnectionError("the service closed before its answer ended")

    async def _switch(self) -> None:
        """After a 101: both ways spliced raw (what h11 already read goes first)."""
        assert self.service is not None and self.upstream is not None
        guest_rest, _ = self.guest.trailing_data
        service_rest, _ = self.upstream.trailing_data
        if guest_rest:
            await self.service.send(bytes(guest_rest))
        if service_rest:
            await self.client.send(bytes(service_rest))
        await asyncio.gather(_pump(self.client, self.service), _pump(self.service, self.client))

    async def _refuse(self, status: int, why: str) -> None:
        if self.guest.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            self.client.abort()
            return
        body = f"kiln egress proxy: {why}\n".encode()
        headers = [("content-type", "text/plain"), ("content-length", str(len(body))), ("connection", "close")]
        await self._send_guest(h11.Response(status_code=status, headers=headers))
        await self._send_guest(h11.Data(data=body))
        await self._send_guest(h11.EndOfMessage())

    async def _send_guest(self, event: h11.Event) -> None:
        data = self.guest.send(event)
        if data:
            await self.client.send(data)

    async def _send_up(self, event: h11.Event) -> None:
        assert self.service is not None and self.upstream is not None
        data = self.upstream.send(event)
        if data:
            await self.service.send(data)


Next = h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]


async def _next(connection: h11.Connection, stream: ByteStream, seconds: float) -> Next:
    """The next event (never NEED_DATA: it reads until there is one; PAUSED at the end of a cycle)."""
    while (event := connection.next_event()) is h11.NEED_DATA:
        connection.receive_data(await asyncio.wait_for(stream.receive(), seconds))
    return event


async def _pump(source: ByteStream, sink: ByteStream) -> None:
    """One way of a switched connection; its end ends the other way too."""
    try:
        while data := await source.receive():
            await sink.send(data)
    finally:
        await sink.aclose()


def _host_of(value: bytes) -> str | None:
    host = value.decode("ascii", "replace")
    if host.startswith("["):
        return None
    name, _, port = host.partition(":")
    return canonical_name(name) if not port or port.isdigit() else None


def _injected(request: h11.Request, injection: Injection, value: bytes) -> list[tuple[bytes, bytes]]:
    """The guest's headers, with the credential's header set and the rest of the rewrite."""
    replaced = {injection.header.lower().encode(), b"accept-encoding", b"expect"}
    headers = [(name, content) for name, content in request.headers.raw_items() if name.lower() not in replaced]
    headers.append((b"accept-encoding", b"identity"))
    headers.append((injection.header.encode(), header_value(injection.prefix, value)))
    return headers


Head = h11.Response | h11.InformationalResponse


def _scrubbed_head(event: Head, value: bytes) -> Head:
    headers = [(name, scrub(bytes(content), value)) for name, content in event.headers.raw_items()]
    return type(event)(status_code=event.status_code, headers=headers, reason=scrub(bytes(event.reason), value))
