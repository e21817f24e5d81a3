"""VMs and their vaults: which vaults a VM may name, what they inject, and keeping running VMs current.

``vault_ids`` of a create or PATCH must name vaults of the VM's owner (any
other id, another user's included, is a 422 naming it). What a VM's vaults
inject (``injections_of_vm``) is read from the store by the node when the
VM's guest is ready or it is claimed for a user, and again whenever it
changes (the node is told to: ``VaultBindings.apply``): a PATCH of
``vault_ids``, a credential added, rotated or deleted, a service added or
deleted, a vault deleted. Each takes effect on the VM's next request, without
a restart.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from kiln.node.network import EgressUnavailable
from kiln.node.node import Node
from kiln.services.errors import FieldProblem, GuestUnavailable, InvalidRequest
from kiln.services.states import VmStatus
from kiln.store.db import Database
from kiln.store.models import VaultCredential, VaultServiceBinding, Vm
from kiln.store.repositories import VmRepository
from kiln.store.vault_repositories import VaultCredentialRepository, VaultRepository, VaultServiceRepository
from kiln.vault.auth import parse_auth_config
from kiln.vault.binding import Injection

log = logging.getLogger(__name__)

MAX_VAULTS_PER_VM = 32
# VMs whose network may be changed live (a booting VM reads its vaults when its network is made).
CURRENT_STATUSES = (VmStatus.CREATING, VmStatus.RUNNING, VmStatus.RESUMING)


def injections(
    vault_ids: Sequence[str], services: Sequence[VaultServiceBinding], credentials: Sequence[VaultCredential]
) -> tuple[Injection, ...]:
    """What these vaults inject, in the VM's order (its vault_ids, then each
    vault's services as made): enabled services whose credential exists."""
    by_name = {(credential.vault_id, credential.name): credential for credential in credentials}
    order = {vault_id: index for index, vault_id in enumerate(vault_ids)}
    made = []
    for service in sorted(services, key=lambda s: order.get(s.vault_id, len(order))):
        if not service.enabled or service.vault_id not in order:
            continue
        auth = parse_auth_config(service.auth_config)
        credential = by_name.get((service.vault_id, auth.credential))
        if credential is None:
            continue  # deleted: the service injects nothing until a credential of that name is back
        made.append(
            Injection(
                vault_id=service.vault_id, service_id=service.id, host=service.host, header=auth.header,
                prefix=auth.prefix, credential_id=credential.id, credential_name=credential.name,
                sealed_value=credential.sealed_value,
            )
        )  # fmt: skip
    return tuple(made)


async def injections_of_vm(db: Database, vm_id: str) -> tuple[Injection, ...]:
    """What the VM's vaults inject now (the node's ``InjectionSource``)."""
    async with db.transaction() as session:
        vm = await VmRepository(session).get_any_owner(vm_id)
        if vm is None or not vm.vault_ids:
            return ()
        services = await VaultServiceRepository(session).list(vm.owner_id, vm.vault_ids)
        credentials = await VaultCredentialRepository(session).list(vm.owner_id, vm.vault_ids)
    return injections(vm.vault_ids, services, credentials)


class VaultBindings:
    def __init__(self, db: Database, node: Node) -> None:
        self.db = db
        self.node = node

    async def checked_ids(self, owner_id: int, vault_ids: Sequence[str] | None) -> list[str]:
        """``vault_ids`` without repeats, each a vault of the owner; InvalidRequest naming the others."""
        wanted = list(dict.fromkeys(vault_ids or ()))
        if len(wanted) > MAX_VAULTS_PER_VM:
            raise InvalidRequest.single(("vault_ids",), f"at most {MAX_VAULTS_PER_VM} vaults")
        if not wanted:
            return []
        async with self.db.transaction() as session:
            found = {vault.id for vault in await VaultRepository(session).list(owner_id, wanted)}
        problems = [
            FieldProblem(("vault_ids", index), f"vault {vault_id} not found")
            for index, vault_id in enumerate(wanted)
            if vault_id not in found
        ]
        if problems:
            raise InvalidRequest(problems)
        return wanted

    async def apply(self, vm: Vm) -> None:
        """Have ``vm``'s network inject what its vaults hold now (the node reads
        them through ``injections_of_vm``); GuestUnavailable if it could not."""
        networking = self.node.networking
        if networking is None or not self.node.wires_networks:
            return  # no VM here has a network: nothing can be intercepted
        try:
            await networking.refresh_vaults(vm.id, self.node.machine(vm.id))
        except EgressUnavailable as error:
            if vm.status != VmStatus.RUNNING:
                # Coming up: it reads its vaults once its guest is ready.
                log.debug("vm %s is %s; its vaults apply when it is ready: %s", vm.id, vm.status, error)
                return
            raise GuestUnavailable(str(error)) from error

    async def refresh_vault(self, owner_id: int, vault_id: str) -> None:
        """After a change of the vault: every current VM bound to it gets what it injects now."""
        await self.refresh(await self._bound(owner_id, vault_id))

    async def refresh(self, vms: Sequence[Vm]) -> None:
        for vm in vms:
            try:
                await self.apply(vm)
            except GuestUnavailable as error:
                # A booting VM without its network yet reads its vaults when it gets one.
                log.warning("vm %s keeps its old vault credentials: %s", vm.id, error)

    async def unbind_everywhere(self, owner_id: int, vault_id: str) -> list[Vm]:
        """A deleted vault leaves the records of the owner's VMs; returns the current ones it left."""
        async with self.db.transaction() as session:
            vms = [vm for vm in await VmRepository(session).list(owner_id) if vault_id in (vm.vault_ids or [])]
            for vm in vms:
                vm.vault_ids = [other for other in vm.vault_ids if other != vault_id]
        return [vm for vm in vms if vm.status in CURRENT_STATUSES]

    async def _bound(self, owner_id: int, vault_id: str) -> list[Vm]:
        async with self.db.transaction() as session:
            vms = await VmRepository(session).list(owner_id, CURRENT_STATUSES)
        return [vm for vm in vms if vault_id in (vm.vault_ids or [])]
