"""Custom domains at server start: the service, its worker, and the hook that
makes a VM's ``custom_domain`` in the VM's own insert (after its share)."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from kiln.config import Settings
from kiln.crypto.master_key import derive_key, load_master_key
from kiln.services.domains.credentials import PURPOSE
from kiln.services.domains.issuance import DomainWorker
from kiln.services.domains.service import DomainService
from kiln.services.vm_policy import CreatePlan
from kiln.services.vms import VmService
from kiln.store.db import Database
from kiln.store.models import Vm


async def start_domains(settings: Settings, db: Database, vms: VmService) -> DomainService:
    """The worker runs until ``service.worker.stop()``."""
    key = derive_key(load_master_key(settings.data_dir, settings.master_key), PURPOSE)
    worker = DomainWorker(settings, db, key)
    service = DomainService(settings, db, worker, key)

    async def domain_of_new_vm(session: AsyncSession, vm: Vm, plan: CreatePlan) -> None:
        await service.domain_new_vm(session, vm, plan)

    vms.admit_hooks.append(domain_of_new_vm)
    worker.start()
    return service
