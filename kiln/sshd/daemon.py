"""The SSH gateway daemon: ``python -m kiln.sshd --config FILE`` (the supervisor runs it).

One asyncio process (asyncssh) in front of every VM of this host. For each connection:

1. the client authenticates with a public key; the username names the VM (its
   id, or a session id) and the key must be one of that VM's owner's
   (``logins.Logins``, the store read-only). Anything else, whatever it is,
   is the same refusal;
2. the first channel opens a ``GuestLink`` to the server's guest relay, which
   binds it to the VM (a suspended VM with ``auto_resume`` is woken first);
3. each channel is a terminal or a command (``sessions``), SFTP or scp
   (``sftp``), or a forwarded connection into the VM (``forwarding``);
4. when the connection ends, its link closes, and the server ends whatever the
   connection still had in the guest.

The host key is made on the first start and kept (``hostkey``). Nothing a
client sends is logged, nor any key: only the VM, the key's fingerprint and
the client's address, at login.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path
from typing import Any

import asyncssh

from kiln.config import Settings
from kiln.router.control import ControlServer
from kiln.sshd import hostkey
from kiln.sshd.forwarding import guest_host, open_forward
from kiln.sshd.logins import Logins
from kiln.sshd.relay import GuestError, GuestLink
from kiln.sshd.sessions import refuse, run_command, run_terminal
from kiln.sshd.sftp import GuestSFTPServer
from kiln.sshd.supervisor import HOST_KEY_FILE
from kiln.store.db import Database
from kiln.store.ssh_keys import SshLogin

log = logging.getLogger("kiln.sshd")

# A client must have authenticated within this long.
LOGIN_SECONDS = 60.0
# Keepalives: a client that answers none of 4, 30 s apart, is dropped.
KEEPALIVE_SECONDS = 30.0
KEEPALIVE_COUNT = 4
SERVER_VERSION = "Kiln"


class GatewayConnection(asyncssh.SSHServer):
    """One client connection: who it logged in as, and its link to the VM."""

    def __init__(self, gateway: SshGateway) -> None:
        self.gateway = gateway
        self.login: SshLogin | None = None
        self.peer = "?"
        self._link: GuestLink | None = None
        self._link_lock = asyncio.Lock()
        self._conn: asyncssh.SSHServerConnection | None = None

    # -- authentication

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        peer = conn.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self.gateway.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.gateway.connections.discard(self)
        if self._link is not None:
            link, self._link = self._link, None
            task = asyncio.get_running_loop().create_task(link.close())
            self.gateway.closing.add(task)
            task.add_done_callback(self.gateway.closing.discard)

    def begin_auth(self, username: str) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False

    def public_key_auth_supported(self) -> bool:
        return True

    async def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        login = await self.gateway.logins.check(username, key)
        if login is None:
            log.info("refused %s from %s (key %s)", _printable(username), self.peer, key.get_fingerprint("sha256"))
            return False
        self.login = login
        return True

    def auth_completed(self) -> None:
        if self.login is not None:
            log.info("vm %s: login from %s", self.login.vm_id, self.peer)

    # -- what a logged-in client may open

    async def link(self) -> GuestLink:
        """This connection's link to its VM, opened (and the VM woken) on first use."""
        assert self.login is not None
        async with self._link_lock:
            if self._link is None:
                link = GuestLink(self.gateway.relay_socket)
                try:
                    await link.open(self.login.vm_id, self.login.owner_id)
                except BaseException:
                    await link.close()
                    raise
                self._link = link
            return self._link

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int) -> Any:
        assert self.login is not None
        host = guest_host(dest_host, {self.login.vm_id, self.login.session_id})
        if host is None:
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, "only ports of the VM itself (localhost) can be forwarded"
            )
        return self._forward(host, dest_port)

    async def _forward(self, host: str, port: int) -> Any:
        try:
            link = await self.link()
        except GuestError as error:
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, error.message) from None
        return await open_forward(link, host, port)

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        return False  # no remote forwarding (-R): the gateway opens no ports


class SshGateway:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.state_dir = settings.sshd_state_dir
        self.relay_socket = self.state_dir / "server.sock"
        self.db = Database(settings.database, read_only=True)
        self.logins = Logins(self.db)
        self.control = ControlServer(self.state_dir / "sshd.sock", self._control)
        self.connections: set[GatewayConnection] = set()
        self.closing: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()

    async def _control(self, request: dict) -> dict:
        if request.get("op") == "ping":
            return {"ok": True, "pid": os.getpid(), "connections": len(self.connections)}
        return {"ok": False, "error": f"unknown op {request.get('op')!r}"}

    async def handle_process(self, process: asyncssh.SSHServerProcess) -> None:
        connection = process.get_extra_info("connection").get_owner()
        assert isinstance(connection, GatewayConnection)
        try:
            link = await connection.link()
        except GuestError as error:
            refuse(process, error.message or error.code)
            return
        try:
            if process.term_type:
                await run_terminal(process, link)
            else:
                await run_command(process, link)
        except GuestError as error:
            refuse(process, error.message or error.code)
        except (ConnectionError, BrokenPipeError, asyncssh.Error):
            process.close()

    def sftp_server(self, chan: asyncssh.SSHServerChannel) -> GuestSFTPServer:
        connection = chan.get_connection().get_owner()
        assert isinstance(connection, GatewayConnection)
        return GuestSFTPServer(chan, connection.link)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        key = hostkey.load_or_create(self.state_dir / HOST_KEY_FILE)
        server = await asyncssh.create_server(
            lambda: GatewayConnection(self),
            self.settings.ssh_listen_host,
            self.settings.ssh_port,
            server_host_keys=[key],
            process_factory=self.handle_process,
            sftp_factory=self.sftp_server,
            allow_scp=True,
            encoding=None,
            line_editor=False,
            agent_forwarding=False,
            x11_forwarding=False,
            allow_pty=True,
            login_timeout=LOGIN_SECONDS,
            keepalive_interval=KEEPALIVE_SECONDS,
            keepalive_count_max=KEEPALIVE_COUNT,
            server_version=SERVER_VERSION,
            reuse_address=True,
        )
        await self.control.start()
        log.info(
            "ssh gateway %d on %s:%d (host key %s)",
            os.getpid(), self.settings.ssh_listen_host, self.settings.ssh_port, key.get_fingerprint("sha256"),
        )  # fmt: skip
        try:
            await self._stopping.wait()
        finally:
            server.close()
            await self.control.stop()
            await self.db.close()
            log.info("ssh gateway %d stopped", os.getpid())


def _printable(username: str) -> str:
    """A username for the log: a client chooses it, so no control characters and no length."""
    return "".join(c if c.isprintable() else "?" for c in username[:80])


def main(config: Path) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # asyncssh logs every channel and request at INFO; its warnings are enough here.
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
    settings = Settings.model_validate_json(config.read_text())
    asyncio.run(SshGateway(settings).run())
