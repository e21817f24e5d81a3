"""Shares at server start: the service, the share router process and what it asks of the server.

The router runs in its own session and, like the VMs, outlives a restart of
the server (the next start adopts it); the server's side of their channel
(``router/server.sock``: wake, activity) and the idle suspender live and die
with the server. ``KILN_SHARE_ROUTER=false`` runs no router (tests of the API alone).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession

from kiln.config import Settings
from kiln.crypto.links import PURPOSE as LINK_PURPOSE
from kiln.crypto.master_key import derive_key, load_master_key
from kiln.router.control import ControlServer
from kiln.router.supervisor import RouterError, RouterSupervisor
from kiln.services.shares.service import ShareService
from kiln.services.shares.wake import IdleSuspender, RouterRequests
from kiln.services.vm_policy import CreatePlan
from kiln.services.vms import VmService
from kiln.store.db import Database
from kiln.store.models import Vm

log = logging.getLogger(__name__)


@dataclass
class Sharing:
    shares: ShareService
    idle: IdleSuspender
    control: ControlServer

    async def stop(self) -> None:
        await self.idle.stop()
        await self.control.stop()


async def start_sharing(settings: Settings, db: Database, vms: VmService) -> Sharing:
    master = load_master_key(settings.data_dir, settings.master_key)
    shares = ShareService(settings, db, vms, derive_key(master, LINK_PURPOSE))

    async def share_of_new_vm(session: AsyncSession, vm: Vm, plan: CreatePlan) -> None:
        await shares.share_new_vm(session, vm, plan.share)

    vms.admit_hooks.append(share_of_new_vm)
    idle = IdleSuspender(settings, vms)
    idle.start()
    supervisor = RouterSupervisor(settings)
    control = ControlServer(supervisor.server_socket, RouterRequests(vms).handle)
    if settings.share_router:
        supervisor.prepare()
        await control.start()
        try:
            await supervisor.start()
        except (RouterError, OSError) as error:
            log.warning("the share router did not start (shares are not served): %s", error)
    return Sharing(shares, idle, control)
