"""Egress policies of existing VMs: read them, change them live.

The VM row holds the policy of record (``Vm.egress_policy``, canonical form),
and it is written only once the policy is in force or cannot be yet:

- a running VM: the node applies the new rules atomically
  (``Networking.apply``: one nft transaction, then the flows and proxied
  connections it now forbids are closed); only then is the row written. If the
  node refuses, the old rules stay and so does the row (422 for a policy it
  cannot enforce, 409 when the host could not apply it);
- a suspended VM: the row is written; the resume builds the VM's network from it;
- a VM being created or resumed: the change waits for that boot to end, then
  goes as above; other states (suspending, ended) are a 409.

Once applied, the row is written while the VM runs or is being saved or is
saved: a suspend that fails goes back to running with the applied rules, one
that ends resumes with the row's.

One lock per VM orders changes of the same VM, so the row always says what the
node enforces. The row is written with a compare-and-set on the status it is
in: a VM that moved on meanwhile to a state that would not read it (a resume
began) is looked at again and the change goes as above.
"""

from __future__ import annotations

import asyncio
import weakref
from dataclasses import dataclass
from typing import Any

from kiln.node.network import EgressRefused, EgressUnavailable, check_rules
from kiln.node.participant import EgressRules
from kiln.services.egress_policy import (
    LISTS,
    allows_anything,
    canonical,
    check_policy,
    network_error,
)
from kiln.services.errors import Conflict, FieldProblem, InvalidRequest
from kiln.services.states import ENDED_STATUSES, VmStatus
from kiln.services.vms import VmService
from kiln.store.models import Vm
from kiln.store.repositories import VmRepository

S = VmStatus
# How often a change looks at a VM again that moved on while it was applied.
ATTEMPTS = 3


@dataclass(frozen=True)
class EgressState:
    vm: Vm
    policy: dict[str, Any]  # canonical
    status: str  # applied, pending, no_network or ended (schemas/egress.py)


class EgressService:
    def __init__(self, vms: VmService) -> None:
        self._vms = vms
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    async def of_vm(self, owner_id: int, vm_id: str) -> EgressState:
        return self._state(await self._vms.get(owner_id, vm_id))

    async def of_session(self, owner_id: int, session_id: str) -> EgressState:
        return self._state(await self._vms.session_vm(owner_id, session_id))

    async def set_for_vm(self, owner_id: int, vm_id: str, policy: dict[str, Any]) -> EgressState:
        await self._vms.get(owner_id, vm_id)  # another user's VM: 404 before anything else
        return await self._set(vm_id, policy)

    async def set_for_session(self, owner_id: int, session_id: str, policy: dict[str, Any]) -> EgressState:
        vm = await self._vms.session_vm(owner_id, session_id)
        return await self._set(vm.id, policy)

    # -- internals

    async def _set(self, vm_id: str, given: dict[str, Any]) -> EgressState:
        problems = check_policy(given, ())
        if problems:
            raise InvalidRequest(problems)
        policy = canonical(given)
        rules = self._vms.egress.rules(policy)
        try:
            check_rules(rules)
        except EgressRefused as error:
            raise _invalid(error) from error
        async with self._lock(vm_id):
            for _ in range(ATTEMPTS):
                vm = await self._vms.wait_booted(vm_id)
                writable: tuple[VmStatus, ...]
                if vm.status == S.RUNNING:
                    await self._apply(vm_id, rules)
                    # Applied: the row may say so while the VM runs, and while it is
                    # saved (a suspend that fails goes back to running with these rules;
                    # one that ends resumes with the row's).
                    writable = (S.RUNNING, S.SUSPENDING, S.SUSPENDED)
                elif vm.status == S.SUSPENDED:
                    writable = (S.SUSPENDED,)
                else:
                    raise Conflict(
                        f"vm {vm_id} is {vm.status}: its egress policy can change while it runs or is suspended"
                    )
                if await self._store(vm_id, policy, writable):
                    return self._state(await self._vms.reload(vm_id))
        raise Conflict(f"vm {vm_id} kept changing state; try again")

    async def _apply(self, vm_id: str, rules: EgressRules) -> None:
        networking = self._vms.node.networking
        if networking is None or not networking.wired(vm_id):
            return  # no network to change: it reaches nothing (network_error says so)
        try:
            await networking.apply(vm_id, rules)
        except EgressRefused as error:
            raise _invalid(error) from error
        except EgressUnavailable as error:
            raise Conflict(
                f"vm {vm_id}: the new egress policy could not be applied, the old one stays: {error}"
            ) from error

    async def _store(self, vm_id: str, policy: dict[str, Any], writable: tuple[VmStatus, ...]) -> bool:
        """Write the policy while the VM is in one of the ``writable`` states
        (a compare-and-set on the one it is in); False once it is in another."""
        for _ in range(ATTEMPTS):
            vm = await self._vms.reload(vm_id)
            if vm.status not in writable:
                return False
            if vm.status == S.RUNNING:
                error = None if self._wired(vm_id) or not allows_anything(policy) else self._no_network(policy)
            else:
                error = network_error(policy, self._vms.node)  # a resume sets it again
            async with self._vms.db.transaction() as session:
                if await VmRepository(session).compare_and_set_status(
                    vm_id, vm.status, vm.status, egress_policy=policy, network_error=error
                ):
                    return True
        return False

    def _no_network(self, policy: dict[str, Any]) -> str:
        return network_error(policy, self._vms.node) or "the VM runs without a network, so it reaches nothing"

    def _wired(self, vm_id: str) -> bool:
        networking = self._vms.node.networking
        return networking is not None and networking.wired(vm_id)

    def _state(self, vm: Vm) -> EgressState:
        if vm.status == S.RUNNING:
            status = "applied" if self._wired(vm.id) else "no_network"
        elif vm.status in ENDED_STATUSES or vm.status == S.TERMINATING:
            status = "ended"
        else:
            status = "pending"
        return EgressState(vm, canonical(vm.egress_policy), status)

    def _lock(self, vm_id: str) -> asyncio.Lock:
        lock = self._locks.get(vm_id)
        if lock is None:
            lock = asyncio.Lock()
            self._locks[vm_id] = lock
        return lock


def _invalid(error: EgressRefused) -> InvalidRequest:
    """A 422 located at the policy key the node's message names (its messages start with it)."""
    message = str(error)
    key = next((key for key in LISTS if message.startswith(f"{key}:")), None)
    return InvalidRequest([FieldProblem((key,) if key else (), message)])
