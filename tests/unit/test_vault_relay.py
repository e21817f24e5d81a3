"""The intercepting relay (kiln.proxy.relay) between in-memory streams: the
credential goes into each request, never back to the guest; the scrubber."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import h11
import pytest

from kiln.proxy.relay import Credential, Relay
from kiln.proxy.scrub import Scrubber
from kiln.proxy.upstream import UpstreamError
from kiln.vault.binding import Injection

SECRET = b"sk-live-7f3a9c"
NAME = "api.echo.test"
INJECTION = Injection("vault_1", "svc_1", "*.echo.test", "Authorization", "Bearer ", "cred_1", "ECHO_KEY", "sealed")


class End:
    """One end of an in-memory byte pipe."""

    def __init__(self) -> None:
        self.inbox: asyncio.Queue[bytes] = asyncio.Queue()
        self.peer: End | None = None
        self.aborted = False
        self.closed = False

    async def receive(self) -> bytes:
        return await self.inbox.get()

    async def send(self, data: bytes) -> None:
        assert self.peer is not None and not self.closed
        if data:  # as a socket: writing nothing is no end of the stream
            await self.peer.inbox.put(data)

    async def aclose(self) -> None:
        self._end()

    def abort(self) -> None:
        self.aborted = True
        self._end()

    def _end(self) -> None:
        if not self.closed and self.peer is not None:
            self.closed = True
            self.peer.inbox.put_nowait(b"")
            self.inbox.put_nowait(b"")  # as a closed socket: our own reads end too


def pipe() -> tuple[End, End]:
    a, b = End(), End()
    a.peer, b.peer = b, a
    return a, b


class EchoService:
    """The far end: answers each request with what it received, as JSON (the secret too)."""

    def __init__(self, chunked: bool = False) -> None:
        self.requests: list[h11.Request] = []
        self.connections = 0
        self.chunked = chunked
        self.tasks: list[asyncio.Task[None]] = []

    async def connect(self) -> End:
        self.connections += 1
        ours, theirs = pipe()
        self.tasks.append(asyncio.create_task(self._serve(ours)))
        return theirs

    async def _serve(self, end: End) -> None:
        connection = h11.Connection(h11.SERVER)
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                connection.receive_data(await end.receive())
                continue
            if isinstance(event, h11.Request):
                self.requests.append(event)
            elif isinstance(event, h11.EndOfMessage):
                request = self.requests[-1]
                body = json.dumps({k.decode(): v.decode() for k, v in request.headers}).encode()
                if self.chunked:
                    head = [("transfer-encoding", "chunked"), ("x-echo", request.headers[0][1])]
                    await end.send(connection.send(h11.Response(status_code=200, headers=head)))
                    for start in range(0, len(body), 5):  # the secret is cut across pieces
                        await end.send(connection.send(h11.Data(data=body[start : start + 5])))
                else:
                    head = [("content-length", str(len(body)))]
                    await end.send(connection.send(h11.Response(status_code=200, headers=head)))
                    await end.send(connection.send(h11.Data(data=body)))
                await end.send(connection.send(h11.EndOfMessage()))
                connection.start_next_cycle()
            elif isinstance(event, h11.ConnectionClosed):
                return


class Guest:
    """The guest's end, speaking HTTP/1.1 through h11 as a client."""

    def __init__(self, end: End) -> None:
        self.end = end
        self.connection = h11.Connection(h11.CLIENT)

    async def get(self, target: str = "/v1/models", host: str = NAME, **headers: str) -> tuple[int, bytes]:
        fields = [("host", host), *((k.replace("_", "-"), v) for k, v in headers.items())]
        await self.end.send(self.connection.send(h11.Request(method="GET", target=target, headers=fields)))
        await self.end.send(self.connection.send(h11.EndOfMessage()))
        status, body = 0, b""
        while True:
            event = self.connection.next_event()
            if event is h11.NEED_DATA:
                self.connection.receive_data(await self.end.receive())
            elif isinstance(event, h11.Response):
                status = event.status_code
                body += b"".join(bytes(v) for _, v in event.headers)
            elif isinstance(event, h11.Data):
                body += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                if self.connection.our_state is h11.DONE and self.connection.their_state is h11.DONE:
                    self.connection.start_next_cycle()
                return status, body
            else:
                raise AssertionError(f"unexpected {event!r}")


Recorded = list[tuple[str, str, int | None, str | None]]


def relay_of(
    service: EchoService, current: Callable[[], Credential | None], connect: Callable | None = None
) -> tuple[Guest, Relay, Recorded, End]:
    guest_end, relay_end = pipe()
    recorded: Recorded = []
    relay = Relay(
        relay_end, NAME, connect=connect or service.connect, current=current,
        record=lambda injection, method, target, status, error: recorded.append((method, target, status, error)),
    )  # fmt: skip
    return Guest(guest_end), relay, recorded, relay_end


@pytest.mark.parametrize("chunked", [False, True])
async def test_the_credential_goes_in_and_never_comes_back(chunked: bool) -> None:
    service = EchoService(chunked)
    guest, relay, recorded, _ = relay_of(service, lambda: Credential(INJECTION, SECRET))
    running = asyncio.create_task(relay.run())
    status, body = await guest.get(authorization="Bearer guest-guess", accept_encoding="gzip", x_other="kept")
    assert status == 200
    (request,) = service.requests
    sent = [(bytes(k), bytes(v)) for k, v in request.headers]
    assert [v for k, v in sent if k == b"authorization"] == [b"Bearer " + SECRET]
    assert [v for k, v in sent if k == b"accept-encoding"] == [b"identity"]
    assert (b"x-other", b"kept") in sent
    assert SECRET not in body and b"Bearer " + b"*" * len(SECRET) in body
    assert recorded == [("GET", "/v1/models", 200, None)]
    await guest.end.aclose()
    await running


async def test_each_request_takes_the_credential_of_that_moment() -> None:
    service = EchoService()
    values = iter([SECRET, b"sk-rotated-0001"])
    guest, relay, recorded, _ = relay_of(service, lambda: Credential(INJECTION, next(values)))
    running = asyncio.create_task(relay.run())
    await guest.get()
    await guest.get("/second")
    assert service.connections == 1  # kept alive
    assert [dict(r.headers)[b"authorization"] for r in service.requests] == [
        b"Bearer " + SECRET, b"Bearer sk-rotated-0001",
    ]  # fmt: skip
    await guest.end.aclose()
    await running


async def test_another_host_on_the_connection_is_421_and_never_reaches_the_service() -> None:
    service = EchoService()
    guest, relay, recorded, end = relay_of(service, lambda: Credential(INJECTION, SECRET))
    running = asyncio.create_task(relay.run())
    status, body = await guest.get(host="evil.example.com")
    assert status == 421 and b"this connection is for api.echo.test" in body
    await running
    assert service.connections == 0 and recorded == [] and end.closed


async def test_an_unbound_host_ends_the_connection_at_its_next_request() -> None:
    service = EchoService()
    bound = [True]
    guest, relay, recorded, end = relay_of(service, lambda: Credential(INJECTION, SECRET) if bound[0] else None)
    running = asyncio.create_task(relay.run())
    assert (await guest.get())[0] == 200
    bound[0] = False
    status, _ = await guest.get()
    assert status == 503
    await running
    assert len(service.requests) == 1 and end.closed


async def test_a_service_that_cannot_be_verified_gets_nothing() -> None:
    service = EchoService()

    async def refuse() -> End:
        raise UpstreamError("the certificate of api.echo.test (203.0.113.9:443) is not trusted: self-signed")

    guest, relay, recorded, _ = relay_of(service, lambda: Credential(INJECTION, SECRET), connect=refuse)
    running = asyncio.create_task(relay.run())
    status, body = await guest.get()
    await running
    assert status == 502 and b"is not trusted" in body and SECRET not in body
    assert recorded == [("GET", "/v1/models", None, "the certificate of api.echo.test (203.0.113.9:443) "
                                                     "is not trusted: self-signed")]  # fmt: skip


def test_the_scrubber_catches_the_secret_across_every_cut() -> None:
    text = b"before " + SECRET + b" middle " + SECRET + SECRET + b" after"
    for cut in range(len(text) + 1):
        for second_cut in range(cut, len(text) + 1):
            scrubber = Scrubber(SECRET)
            out = b"".join(
                scrubber.feed(piece) for piece in (text[:cut], text[cut:second_cut], text[second_cut:])
            ) + scrubber.flush()
            assert len(out) == len(text) and SECRET not in out
            assert out == text.replace(SECRET, b"*" * len(SECRET))


async def test_a_switch_of_protocols_is_spliced_after_its_101() -> None:
    async def upgrade_service() -> End:
        ours, theirs = pipe()

        async def serve() -> None:
            connection = h11.Connection(h11.SERVER)
            while not isinstance(event := connection.next_event(), h11.Request):
                connection.receive_data(await ours.receive())
            assert dict(event.headers)[b"authorization"] == b"Bearer " + SECRET
            upgraded = [("upgrade", "echo"), ("connection", "upgrade")]
            switch = h11.InformationalResponse(status_code=101, headers=upgraded)
            await ours.send(connection.send(switch))
            while data := await ours.receive():
                await ours.send(data[::-1])

        asyncio.get_running_loop().create_task(serve())
        return theirs

    guest_end, relay_end = pipe()
    recorded: Recorded = []
    relay = Relay(
        relay_end, NAME, connect=upgrade_service, current=lambda: Credential(INJECTION, SECRET),
        record=lambda injection, method, target, status, error: recorded.append((method, target, status, error)),
    )  # fmt: skip
    running = asyncio.create_task(relay.run())
    head = f"GET /ws HTTP/1.1\r\nHost: {NAME}\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n".encode()
    await guest_end.send(head)
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += await guest_end.receive()
    assert answer.startswith(b"HTTP/1.1 101 ")
    await guest_end.send(b"ping")
    assert await guest_end.receive() == b"gnip"
    await guest_end.aclose()
    await asyncio.wait_for(running, 5)
    assert recorded == [("GET", "/ws", 101, None)]
