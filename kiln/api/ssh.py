"""The SSH gateway at server start: the guest relay it talks to, the gateway
process, and a watchdog that starts it again if it died.

The gateway runs in its own session and, like the share router, outlives a
restart of the server (the next start adopts it); the relay socket
(``sshd/server.sock``) and the watchdog live and die with the server. While
the server is away, logins fail at their first channel (nothing to relay to).
``KILN_SSH_GATEWAY=false`` runs no gateway (tests of the API alone).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from kiln.config import Settings
from kiln.services.guest_relay import GuestRelay
from kiln.services.vms import VmService
from kiln.sshd.supervisor import SshGatewayError, SshGatewaySupervisor

log = logging.getLogger(__name__)

WATCH_SECONDS = 2.0


@dataclass
class SshGateway:
    relay: GuestRelay
    server: asyncio.Server | None
    watchdog: asyncio.Task[None] | None

    async def stop(self) -> None:
        """Stop relaying (the gateway process stays, for the next start to adopt)."""
        if self.watchdog is not None:
            self.watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.watchdog
        if self.server is not None:
            self.server.close()
        await self.relay.close()


async def start_ssh_gateway(settings: Settings, vms: VmService) -> SshGateway:
    relay = GuestRelay(vms)
    if not settings.ssh_gateway:
        return SshGateway(relay, None, None)
    supervisor = SshGatewaySupervisor(settings)
    supervisor.prepare()
    path = supervisor.relay_socket
    path.unlink(missing_ok=True)
    server = await asyncio.start_unix_server(relay.serve, path=str(path))
    path.chmod(0o600)
    await _start(supervisor)
    return SshGateway(relay, server, asyncio.create_task(_watch(supervisor), name="ssh-gateway-watchdog"))


async def _start(supervisor: SshGatewaySupervisor) -> bool:
    try:
        await supervisor.start()
        return True
    except (SshGatewayError, OSError) as error:
        log.warning("the ssh gateway did not start (no ssh into VMs): %s", error)
        return False


async def _watch(supervisor: SshGatewaySupervisor) -> None:
    """Start the gateway again when it stops answering (it crashed, or was killed)."""
    while True:
        await asyncio.sleep(WATCH_SECONDS)
        if await supervisor.ping() is None:
            log.warning("the ssh gateway does not answer: starting it again")
            await _start(supervisor)
