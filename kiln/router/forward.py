"""Passing one request to the guest and its answer back, streamed, with aiohttp.

Plain HTTP/1.1: the request body is read from the client as it arrives and
written to the guest as it is read (chunked stays chunked, a Content-Length
stays), the answer likewise; nothing is buffered whole, nothing decompressed.
WebSocket: the router connects to the guest first (so a port that refuses is a
502 page, not a broken upgrade), then accepts the client's upgrade with the
subprotocol the guest chose and relays messages both ways until either side
closes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

# Hop-by-hop headers (RFC 9110 7.6.1) and what aiohttp sets itself.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te", "trailer",
     "transfer-encoding", "upgrade"}
)  # fmt: skip
WEBSOCKET_HANDSHAKE = frozenset(
    {"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions", "sec-websocket-protocol"}
)
CHUNK_BYTES = 64 * 1024
# A client's WebSocket is pinged this often; one that does not answer is closed.
WEBSOCKET_HEARTBEAT_SECONDS = 30.0


class GuestUnreachable(Exception):
    """Nothing accepted the connection at the VM's port (the router answers 502)."""


def forwarded_headers(
    headers: CIMultiDictProxy[str], drop: Iterable[str], *, client: str | None, scheme: str
) -> CIMultiDict[str]:
    """The headers the guest gets: the client's, less hop-by-hop ones, ``drop``
    (Kiln's credentials) and any ``Connection``-named ones; plus X-Forwarded-*."""
    named = {token.strip().lower() for token in headers.get("Connection", "").split(",") if token.strip()}
    skip = HOP_BY_HOP | named | {name.lower() for name in drop}
    out: CIMultiDict[str] = CIMultiDict((key, value) for key, value in headers.items() if key.lower() not in skip)
    if client:
        earlier = headers.get("X-Forwarded-For")
        out["X-Forwarded-For"] = f"{earlier}, {client}" if earlier else client
    out["X-Forwarded-Proto"] = scheme
    out["X-Forwarded-Host"] = headers.get("Host", "")
    return out


def guest_url(address: str, port: int, raw_path: str, *, websocket: bool = False) -> URL:
    return URL(f"{'ws' if websocket else 'http'}://{address}:{port}{raw_path}", encoded=True)


async def http(
    request: web.Request, session: aiohttp.ClientSession, url: URL, headers: CIMultiDict[str]
) -> web.StreamResponse:
    body = request.content.iter_chunked(CHUNK_BYTES) if request.body_exists else None
    try:
        upstream = await session.request(
            request.method, url, headers=headers, data=body, allow_redirects=False, skip_auto_headers=("User-Agent",)
        )
    except aiohttp.ClientConnectorError as error:
        raise GuestUnreachable(str(error)) from error
    try:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        for key, value in upstream.headers.items():
            if key.lower() not in HOP_BY_HOP:
                response.headers.add(key, value)
        if upstream.headers.get("Content-Length") is None and request.version < aiohttp.HttpVersion11:
            response.force_close()
        await response.prepare(request)
        async for chunk in upstream.content.iter_chunked(CHUNK_BYTES):
            await response.write(chunk)
        await response.write_eof()
        return response
    finally:
        upstream.release()


async def websocket(
    request: web.Request, session: aiohttp.ClientSession, url: URL, headers: CIMultiDict[str]
) -> web.WebSocketResponse:
    offered = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
    for name in WEBSOCKET_HANDSHAKE:
        headers.popall(name, None)
    try:
        upstream = await session.ws_connect(
            url, headers=headers, protocols=offered, autoping=True, max_msg_size=0, autoclose=False
        )
    except (aiohttp.ClientConnectorError, aiohttp.WSServerHandshakeError) as error:
        raise GuestUnreachable(str(error)) from error
    client = web.WebSocketResponse(
        protocols=(upstream.protocol,) if upstream.protocol else (),
        heartbeat=WEBSOCKET_HEARTBEAT_SECONDS,
        max_msg_size=0,
        autoclose=False,
    )
    try:
        await client.prepare(request)
        await _relay(client, upstream)
    finally:
        await upstream.close()
        await client.close()
    return client


async def _relay(client: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse) -> None:
    async def pump(
        source: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
        sink: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
    ) -> None:
        async for message in source:
            if message.type == aiohttp.WSMsgType.TEXT:
                await sink.send_str(message.data)
            elif message.type == aiohttp.WSMsgType.BINARY:
                await sink.send_bytes(message.data)
            elif message.type == aiohttp.WSMsgType.CLOSE:
                break
        # One side closed: pass its close code on.
        code = source.close_code or aiohttp.WSCloseCode.OK
        with contextlib.suppress(ConnectionError, RuntimeError):
            await sink.close(code=code)

    tasks = [asyncio.create_task(pump(client, upstream)), asyncio.create_task(pump(upstream, client))]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
