"""The egress daemon: the guest DNS, the transparent proxy and a control socket, in one asyncio process.

Run as ``python -m kiln.proxy --config FILE`` (``kiln.proxy.supervisor`` does).
It listens on the host's link address (bound with IP_FREEBIND: the address
exists only while some VM link does), reads every VM's policy from the feed,
and reloads on a control-socket notice and once a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import signal
import socket
from pathlib import Path

from kiln.config import Settings
from kiln.crypto.master_key import derive_key, load_master_key
from kiln.net.addresses import AddressPlan
from kiln.net.answers import AnswerBook
from kiln.net.dns import GuestDns, Upstream, upstream_resolver
from kiln.net.feed import MAX_CONTROL_LINE, PolicyDirectory
from kiln.net.host import never_reachable
from kiln.net.registry import VmRegistry
from kiln.proxy.intercept import Interceptor
from kiln.proxy.transparent import TransparentProxy
from kiln.proxy.upstream import upstream_context
from kiln.vault.binding import VAULT_PURPOSE
from kiln.vault.ca import EgressCa, ca_directory
from kiln.vault.journal import CallJournal

log = logging.getLogger("kiln.proxy")

IP_FREEBIND = 15  # linux/in.h; not in Python 3.11's socket module
RESCAN_SECONDS = 1.0
LISTEN_BACKLOG = 1024


def _socket(kind: int, address: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
    sock.bind((address, port))
    sock.setblocking(False)
    if kind == socket.SOCK_STREAM:
        sock.listen(LISTEN_BACKLOG)
    return sock


class EgressDaemon:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        plan = AddressPlan.from_settings(settings)
        self.plan = plan
        never = never_reachable(plan)
        self.feed = PolicyDirectory(settings.net_state_dir)
        self.registry = VmRegistry(self.feed, plan, blocked=list(settings.net_blocked_cidrs), never=never)
        self.book = AnswerBook(settings.net_nft_table)
        blocked = [ipaddress.IPv4Network(c) for c in [*settings.net_blocked_cidrs, *never]]
        self.dns = GuestDns(
            self.registry,
            self.book,
            upstream_resolver(Upstream.parse(settings.dns_upstream)),
            blocked=blocked,
            max_ttl=settings.net_dns_max_ttl,
            grace_seconds=settings.net_dns_grace_seconds,
        )
        # Vaults: the daemon makes the egress CA (its key never leaves this
        # process) and holds the master key that opens what it injects.
        self.journal = CallJournal(settings.net_state_dir)
        interceptor = Interceptor(
            self.registry,
            EgressCa.load_or_create(ca_directory(settings.net_state_dir)),
            # Read, never made here: the server makes it before it starts the daemon.
            derive_key(load_master_key(settings.data_dir, settings.master_key, create=False), VAULT_PURPOSE),
            self.journal,
            upstream_tls=upstream_context(settings.egress_ca_bundle),
            mark=settings.net_egress_mark,
        )
        self.proxy = TransparentProxy(
            self.registry,
            self.book,
            host_address=str(plan.host_address),
            mark=settings.net_egress_mark,
            interceptor=interceptor,
        )
        self._reload_lock = asyncio.Lock()
        self._stopping = asyncio.Event()

    async def reload(self) -> None:
        """Read the feed; prune DNS answers and close connections of changed or gone VMs."""
        async with self._reload_lock:
            changed, gone = self.registry.reload()
            for vm in changed:
                await self.book.keep_only(vm.vm_id, vm.lease, vm.allows_name)
                self.proxy.recheck(vm.vm_id)
            for vm_id in gone:
                self.book.forget(vm_id)
                self.proxy.recheck(vm_id)

    async def control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5.0)
            request = json.loads(line or b"{}")
            op = request.get("op")
            if op == "reload":
                await self.reload()
                answer: dict[str, object] = {"ok": True}
            elif op == "rotate_calls":
                self.journal.rotate()  # the API takes the vault calls recorded so far
                answer = {"ok": True}
            elif op == "ping":
                answer = {"ok": True, "pid": os.getpid(), "vms": self.registry.count}
            else:
                answer = {"ok": False, "error": f"unknown op {op!r}"}
        except (ValueError, TimeoutError, ConnectionError) as error:
            answer = {"ok": False, "error": str(error)}
        with contextlib.suppress(ConnectionError):
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        writer.close()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        self.feed.ensure()
        host = str(self.plan.host_address)
        await self.reload()
        udp, _ = await loop.create_datagram_endpoint(
            self.dns.udp_protocol, sock=_socket(socket.SOCK_DGRAM, host, self.settings.net_dns_port)
        )
        dns_tcp = await asyncio.start_server(
            self.dns.serve_tcp, sock=_socket(socket.SOCK_STREAM, host, self.settings.net_dns_port)
        )
        proxy = await asyncio.start_server(
            self.proxy.handle, sock=_socket(socket.SOCK_STREAM, host, self.settings.net_proxy_port)
        )
        control_path = self.feed.control_socket
        control_path.unlink(missing_ok=True)
        control = await asyncio.start_unix_server(self.control, path=str(control_path), limit=MAX_CONTROL_LINE)
        control_path.chmod(0o600)
        log.info(
            "egress daemon %d: DNS %s:%d, proxy %s:%d, %d VMs",
            os.getpid(), host, self.settings.net_dns_port, host, self.settings.net_proxy_port,
            self.registry.count,
        )  # fmt: skip
        rescan = asyncio.create_task(self._rescan())
        try:
            await self._stopping.wait()
        finally:
            rescan.cancel()
            udp.close()
            for server in (dns_tcp, proxy, control):
                server.close()
            for connections in self.proxy.live.values():
                for connection in list(connections):
                    connection.close()
            control_path.unlink(missing_ok=True)
            log.info("egress daemon %d stopped", os.getpid())

    async def _rescan(self) -> None:
        while True:
            await asyncio.sleep(RESCAN_SECONDS)
            try:
                await self.reload()
                self.book.expire()
            except Exception:
                log.exception("policy rescan failed")


def main(config: Path) -> None:
    settings = Settings.model_validate_json(config.read_text())
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    asyncio.run(EgressDaemon(settings).run())
