"""What the guest DNS told each VM: name -> address, until when.

The egress proxy admits a connection only to an address the guest DNS gave
that VM for the very name the connection names (Host or SNI); the kernel
admits (redirects to the proxy) only addresses in the VM's DNS set. Both are
fed here: ``give`` updates the VM's set in Kiln's table before the answer
leaves, so a guest that connects right after its lookup is never refused.

Lives in the egress daemon's memory. After a daemon restart it starts empty:
guests resolve again (their cached answers meet a refusal, never a wrong admit).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kiln.net import nft
from kiln.net.addresses import Lease
from kiln.net.ruleset import dns_elements, dns_removals

Clock = Callable[[], float]
NftRunner = Callable[[list[dict]], object]


@dataclass
class _VmAnswers:
    lease: Lease
    # name -> address -> expiry (clock time)
    names: dict[str, dict[str, float]] = field(default_factory=dict)

    def addresses(self, now: float) -> set[str]:
        return {a for given in self.names.values() for a, expiry in given.items() if expiry > now}


class AnswerBook:
    def __init__(self, table: str, *, clock: Clock = time.monotonic, run_nft: NftRunner = nft.run) -> None:
        self.table = table
        self._clock = clock
        self._run_nft = run_nft
        self._vms: dict[str, _VmAnswers] = {}
        self._lock = asyncio.Lock()

    async def give(self, vm_id: str, lease: Lease, name: str, addresses: list[str], seconds: int) -> None:
        """Record that ``name`` resolved to ``addresses`` for the VM, admitted for ``seconds``."""
        if not addresses:
            return
        async with self._lock:
            vm = self._vms.get(vm_id)
            if vm is None or vm.lease != lease:
                vm = self._vms[vm_id] = _VmAnswers(lease)
            now = self._clock()
            given = vm.names.setdefault(name, {})
            timeouts: dict[str, int] = {}
            for address in addresses:
                expiry = max(given.get(address, 0.0), now + seconds)
                given[address] = expiry
                # The set element lives as long as the longest name that gave it.
                longest = max(
                    (e for other in vm.names.values() for a, e in other.items() if a == address), default=expiry
                )
                timeouts[address] = max(1, int(longest - now + 0.999))
            await asyncio.to_thread(self._run_nft, dns_elements(self.table, lease, timeouts))

    def given(self, vm_id: str, name: str, address: str) -> bool:
        vm = self._vms.get(vm_id)
        if vm is None:
            return False
        return vm.names.get(name, {}).get(address, 0.0) > self._clock()

    async def keep_only(self, vm_id: str, lease: Lease, keep: Callable[[str], bool]) -> list[str]:
        """Forget the VM's names that ``keep`` refuses (its policy changed) and
        take their addresses out of its set unless another kept name gave them.
        Returns the addresses removed."""
        async with self._lock:
            vm = self._vms.get(vm_id)
            if vm is None:
                return []
            now = self._clock()
            before = vm.addresses(now)
            vm.names = {name: given for name, given in vm.names.items() if keep(name)}
            removed = sorted(before - vm.addresses(now))
            if removed and vm.lease == lease:
                await asyncio.to_thread(self._run_nft, dns_removals(self.table, lease, removed))
            return removed

    def forget(self, vm_id: str) -> None:
        """The VM is gone (its set went with its chains)."""
        self._vms.pop(vm_id, None)

    def expire(self) -> None:
        now = self._clock()
        for vm in self._vms.values():
            for name in list(vm.names):
                live = {a: e for a, e in vm.names[name].items() if e > now}
                if live:
                    vm.names[name] = live
                else:
                    del vm.names[name]
