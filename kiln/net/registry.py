"""The egress daemon's view of the VMs: who sends from which address, under which policy.

Built from the policy feed (``kiln.net.feed``). A VM is known by its outside
address, which only its own link may carry (the host drops anything else
arriving on it), so the source address of a query or connection names the VM.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from kiln.net.addresses import AddressPlan, Lease
from kiln.net.feed import PolicyDirectory, VmEgress
from kiln.net.policy import CompiledPolicy, PolicyError, compile_policy
from kiln.vault.binding import Injection, injection_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KnownVm:
    vm_id: str
    lease: Lease
    policy: CompiledPolicy
    generation: int
    # Its vaults' services: their hosts are answered and intercepted whatever the policy says.
    injections: tuple[Injection, ...] = ()

    def injection_for(self, name: str) -> Injection | None:
        return injection_for(self.injections, name)

    def allows_name(self, name: str) -> bool:
        """Whether the guest DNS answers ``name``: the policy allows it, or a vault service covers it."""
        return self.policy.allows_name(name) or self.injection_for(name) is not None


class VmRegistry:
    def __init__(self, feed: PolicyDirectory, plan: AddressPlan, *, blocked: list[str], never: list[str]) -> None:
        self.feed = feed
        self.plan = plan
        self.blocked = blocked
        self.never = never
        self._by_address: dict[str, KnownVm] = {}
        self._by_id: dict[str, KnownVm] = {}

    @property
    def count(self) -> int:
        return len(self._by_id)

    def by_address(self, address: str) -> KnownVm | None:
        return self._by_address.get(address)

    def by_id(self, vm_id: str) -> KnownVm | None:
        return self._by_id.get(vm_id)

    def reload(self) -> tuple[list[KnownVm], list[str]]:
        """Read the feed again; returns (VMs new or changed, ids of VMs gone)."""
        fresh: dict[str, KnownVm] = {}
        for egress in self.feed.published().values():
            vm = self._known(egress)
            if vm is not None:
                fresh[vm.vm_id] = vm
        changed = [vm for vm_id, vm in fresh.items() if self._by_id.get(vm_id) != vm]
        gone = [vm_id for vm_id in self._by_id if vm_id not in fresh]
        self._by_id = fresh
        self._by_address = {vm.lease.outside_address: vm for vm in fresh.values()}
        return changed, gone

    def _known(self, egress: VmEgress) -> KnownVm | None:
        try:
            lease = self.plan.lease(egress.lease)
            policy = compile_policy(egress.rules, blocked=self.blocked, never=self.never)
        except (ValueError, PolicyError) as error:
            log.error("policy of VM %s ignored (its VM gets nothing): %s", egress.vm_id, error)
            return None
        if lease.outside_address != egress.outside_address:
            log.error(
                "policy of VM %s names %s, not its lease's address: ignored", egress.vm_id, egress.outside_address
            )
            return None
        return KnownVm(egress.vm_id, lease, policy, egress.generation, egress.injections)
