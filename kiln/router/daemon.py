"""The share router daemon: ``python -m kiln.router --config FILE`` (the supervisor runs it).

One asyncio process (aiohttp's server and client) in front of every share of
this host. For each request:

1. the Host header names the share (``<share-id>.<KILN_SHARE_DOMAIN>``);
2. the store says what it is (``ShareRepository.route_any_owner``, a read-only
   connection): unknown, revoked or deleted, or its VM gone: 404;
3. a private share checks the credentials (``access.Gatekeeper``); a signed link
   becomes a cookie for this host and a redirect to the same URL without it;
4. a suspended VM with ``auto_resume`` is woken through the server's control
   socket and the request held until it runs (or 503);
5. the request goes to the VM's outside address and the share's port, without
   Kiln's credentials: plain HTTP or a WebSocket (``forward``); nothing
   listening there is a 502 page.

VMs that had traffic, or hold open connections, are reported to the server
every ``ACTIVITY_SECONDS`` (what ``auto_suspend`` measures idleness by).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import signal
import time
from pathlib import Path
from urllib.parse import urlencode

import aiohttp
from aiohttp import web

from kiln.config import Settings
from kiln.crypto.credentials import API_KEY_PREFIX
from kiln.crypto.links import PURPOSE as LINK_PURPOSE
from kiln.crypto.master_key import derive_key, load_master_key
from kiln.domains.certs import CertificateFiles
from kiln.net.participant import LEASE
from kiln.router import forward
from kiln.router.access import COOKIE, LINK_PARAMETER, Gatekeeper, Verdict, credentials_of, strip_cookie
from kiln.router.control import ControlServer, ask
from kiln.router.hosts import host_name, share_id_of
from kiln.router.pages import page
from kiln.router.tls import SniCertificates
from kiln.store.db import Database
from kiln.store.domains import DomainRepository
from kiln.store.shares import ShareRepository, ShareRoute

log = logging.getLogger("kiln.router")

ACTIVITY_SECONDS = 2.0
# How long a request to a suspended VM is held while it resumes.
WAKE_SECONDS = 120.0
# A keep-alive connection with no request is closed after this long.
KEEPALIVE_SECONDS = 75.0
CONNECT_SECONDS = 10.0
# No byte from the guest for this long ends a plain HTTP answer (WebSockets are pinged instead).
GUEST_IDLE_SECONDS = 300.0
RESUMABLE = frozenset({"suspended", "suspending", "resuming"})


class ShareRouter:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.state_dir = settings.router_state_dir
        self.db = Database(settings.database, read_only=True)
        link_key = derive_key(load_master_key(settings.data_dir, settings.master_key, create=False), LINK_PURPOSE)
        self.gate = Gatekeeper(self.db, settings.data_dir, link_key)
        self.server_socket = self.state_dir / "server.sock"
        self.control = ControlServer(self.state_dir / "router.sock", self._control)
        self.certificates = SniCertificates(CertificateFiles(settings.domains_dir))
        self.https_port = 0  # the HTTPS port served, once it is
        self.active: set[str] = set()
        self.open: collections.Counter[str] = collections.Counter()
        self._stopping = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None

    # -- one request

    async def handle(self, request: web.Request) -> web.StreamResponse:
        share_id = await self._share_of(request)
        if isinstance(share_id, web.Response):
            return share_id
        if share_id is None:
            return page(404, "This host names no share.")
        route = await self._route(share_id)
        if route is None or route.status != "active":
            return page(404, "This share does not exist, or it was revoked.")
        credentials = credentials_of(request.headers, request.query)
        if not route.is_public:
            verdict = await self.gate.verdict(credentials, share_id, route.owner_id)
            if verdict is Verdict.NOT_YOURS:
                return page(404, "This share does not exist, or it was revoked.")
            if verdict is Verdict.SIGN_IN:
                return page(401, "This share is private: open it with a signed link, or send its owner's API key.")
        expires = self.gate.link_expiry(credentials.link_token, share_id)
        if expires is not None and request.method in ("GET", "HEAD"):
            return self._enter_with_link(request, credentials.link_token or "", expires)
        running = await self._running(route)
        if isinstance(running, web.Response):
            return running
        if running.outside_address is None:
            return page(502, "This share's VM has no network on this host.")
        return await self._forward(request, running)

    async def _share_of(self, request: web.Request) -> str | web.Response | None:
        """The share a request is for: over HTTPS, a custom domain's (its Host);
        over HTTP, ``<share-id>.<KILN_SHARE_DOMAIN>``, and a custom domain is
        sent to its HTTPS URL."""
        host = request.headers.get("Host", "")
        if request.secure:
            return await self._share_of_domain(host_name(host))
        share_id = share_id_of(host, self.settings.share_domain)
        if share_id is not None or not self.settings.share_https_port:
            return share_id
        name = host_name(host)
        if await self._share_of_domain(name) is None or self.certificates.context_for(name) is None:
            return None
        port = self.settings.share_https_port
        location = f"https://{name}{'' if port == 443 else f':{port}'}{request.raw_path}"
        return web.Response(status=308, headers={"Location": location})

    async def _share_of_domain(self, name: str) -> str | None:
        async with self.db.transaction() as session:
            return await DomainRepository(session).share_of_domain_any_owner(name)

    def _enter_with_link(self, request: web.Request, token: str, expires: int) -> web.Response:
        """Set the link's cookie for this host (HttpOnly, so scripts in the page
        never see it) and send the browser to the same URL without the token."""
        query = [(key, value) for key, value in request.query.items() if key != LINK_PARAMETER]
        location = request.path + (f"?{urlencode(query)}" if query else "")
        response = web.Response(status=303, headers={"Location": location, "Cache-Control": "no-store"})
        max_age = max(expires - int(time.time()), 1)
        response.set_cookie(
            COOKIE, token, max_age=max_age, path="/", httponly=True, samesite="Lax", secure=request.secure
        )
        return response

    async def _running(self, route: ShareRoute) -> ShareRoute | web.Response:
        """The route of a running VM; a resumable one is woken first."""
        if route.vm_status == "running":
            return route
        if route.vm_status not in RESUMABLE:
            return page(503, f"This share's VM is {route.vm_status}.")
        if not route.auto_resume:
            return page(503, "This share's VM is suspended (it was not made to resume on request).")
        try:
            answer = await ask(self.server_socket, {"op": "wake", "vm_id": route.vm_id}, timeout=WAKE_SECONDS)
        except (OSError, TimeoutError, ValueError) as error:
            return page(503, f"The VM could not be woken now ({error or type(error).__name__}); try again.")
        if not answer.get("ok"):
            return page(503, f"The VM could not be woken: {answer.get('error', 'unknown reason')}.")
        woken = await self._route(route.share_id)
        if woken is None or woken.status != "active" or woken.vm_status != "running":
            return page(503, "The VM stopped again while it was woken.")
        return woken

    async def _forward(self, request: web.Request, route: ShareRoute) -> web.StreamResponse:
        assert self._session is not None
        headers = forward.forwarded_headers(
            request.headers, self._kiln_headers(request), client=request.remote, scheme=request.scheme
        )
        if "Cookie" in headers:
            remaining = strip_cookie(headers["Cookie"])
            if remaining:
                headers["Cookie"] = remaining
            else:
                del headers["Cookie"]
        websocket = request.headers.get("Upgrade", "").lower() == "websocket"
        url = forward.guest_url(route.outside_address or "", route.port, _without_link(request), websocket=websocket)
        self.active.add(route.vm_id)
        self.open[route.vm_id] += 1
        try:
            if websocket:
                return await forward.websocket(request, self._session, url, headers)
            return await forward.http(request, self._session, url, headers)
        except forward.GuestUnreachable:
            return page(502, f"Nothing is listening on port {route.port} of this share's VM.")
        except (TimeoutError, aiohttp.ServerTimeoutError):
            return page(504, f"The VM's port {route.port} did not answer in time.")
        finally:
            self.open[route.vm_id] -= 1
            if self.open[route.vm_id] <= 0:
                del self.open[route.vm_id]
            self.active.add(route.vm_id)

    def _kiln_headers(self, request: web.Request) -> list[str]:
        """Headers that carry a Kiln credential (the guest never sees them)."""
        drop = []
        if request.headers.get("X-API-Key", "").startswith(API_KEY_PREFIX):
            drop.append("X-API-Key")
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer" and (value.startswith(API_KEY_PREFIX) or self.gate.is_kiln_token(value)):
            drop.append("Authorization")
        return drop

    async def _route(self, share_id: str) -> ShareRoute | None:
        async with self.db.transaction() as session:
            return await ShareRepository(session).route_any_owner(share_id, LEASE)

    # -- the process

    async def _control(self, request: dict) -> dict:
        if request.get("op") == "ping":
            return {
                "ok": True,
                "pid": os.getpid(),
                "open": sum(self.open.values()),
                "https_port": self.https_port,
            }
        return {"ok": False, "error": f"unknown op {request.get('op')!r}"}

    async def _report_activity(self) -> None:
        while True:
            await asyncio.sleep(ACTIVITY_SECONDS)
            used = sorted(self.active | set(self.open))
            self.active.clear()
            if used:
                try:
                    await ask(self.server_socket, {"op": "activity", "vm_ids": used})
                except (OSError, TimeoutError, ValueError):
                    pass  # the server is away; it counts every VM as used when it starts

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_SECONDS, sock_read=GUEST_IDLE_SECONDS)
        connector = aiohttp.TCPConnector(limit=0, force_close=False)
        self._session = aiohttp.ClientSession(
            timeout=timeout, connector=connector, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar()
        )
        app = web.Application(client_max_size=0)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        runner = web.AppRunner(app, access_log=None, keepalive_timeout=KEEPALIVE_SECONDS, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.settings.share_listen_host, self.settings.share_http_port, reuse_address=True)
        await site.start()
        if self.settings.share_https_port:
            tls = self.certificates.server_context()
            secure = web.TCPSite(
                runner, self.settings.share_listen_host, self.settings.share_https_port, ssl_context=tls,
                reuse_address=True,
            )  # fmt: skip
            try:
                await secure.start()
                self.https_port = self.settings.share_https_port
            except OSError as error:
                # Shares over HTTP still work; the next server start tries again (ping says 0).
                log.error("custom domains are not served: port %d: %s", self.settings.share_https_port, error)
        await self.control.start()
        reporter = asyncio.create_task(self._report_activity())
        log.info(
            "share router %d: http://*.%s on %s:%d, custom domains over HTTPS on port %d",
            os.getpid(), self.settings.share_domain, self.settings.share_listen_host, self.settings.share_http_port,
            self.settings.share_https_port,
        )  # fmt: skip
        try:
            await self._stopping.wait()
        finally:
            reporter.cancel()
            await self.control.stop()
            await runner.cleanup()
            await self._session.close()
            await self.db.close()
            log.info("share router %d stopped", os.getpid())


def _without_link(request: web.Request) -> str:
    """The raw path and query, less the link parameter (only for non-GET requests it stays in the URL)."""
    if LINK_PARAMETER not in request.query:
        return request.raw_path
    query = [(key, value) for key, value in request.query.items() if key != LINK_PARAMETER]
    return request.path + (f"?{urlencode(query)}" if query else "")


def main(config: Path) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = Settings.model_validate_json(config.read_text())
    asyncio.run(ShareRouter(settings).run())
