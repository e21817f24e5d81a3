"""The network's part in every VM's life (``kiln.node.participant.Participant``).

Resources (kind: name), each recorded in the ledger before it is made:

=============== ===================================== ===========================================
kind            name                                  what
=============== ===================================== ===========================================
lease           ``<prefix>/<n>``                      lease number n: the outside address, the names below
netns           ``<prefix>ns-<n>``                    the VM's namespace (its TAP and veth end inside)
veth            ``<prefix>v<n>``                      the host end of the VM's link
nft-chain       ``<table>/vm<n>``                     the VM's chains, sets and map elements in Kiln's table
egress-policy   ``<data>/net/policies/<vm_id>.json``  the policy the egress daemon enforces for it
=============== ===================================== ===========================================
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

from kiln.config import Settings
from kiln.net import conntrack, links, netns, nft
from kiln.net import host as host_setup
from kiln.net.addresses import AddressPlan, Lease
from kiln.net.feed import PolicyDirectory, PolicyFeed, VmEgress
from kiln.net.host import NetStatus, host_rules, never_reachable
from kiln.net.policy import CompiledPolicy, compile_policy
from kiln.net.ruleset import FAMILY, add_vm, remove_vm, update_vm
from kiln.node.participant import EgressRules, HostResource, Launch, Ledger, VmContext
from kiln.runtime.driver import Machine, Nic
from kiln.vault.binding import Injection
from kiln.vault.ca import GUEST_TRUST_NAME, read_certificate

log = logging.getLogger(__name__)

LEASE = "lease"
NETNS = "netns"
VETH = "veth"
NFT_CHAIN = "nft-chain"
EGRESS_POLICY = "egress-policy"
# Released in this order (the reverse of creation).
RELEASE_ORDER = (EGRESS_POLICY, NFT_CHAIN, VETH, NETNS, LEASE)
NET_CONFIG_TIMEOUT_SECONDS = 15.0
TRUST_CA_TIMEOUT_SECONDS = 15.0

# The credentials a VM's vaults inject (the service layer reads them from the store).
InjectionSource = Callable[[str], Awaitable[tuple[Injection, ...]]]


async def no_injections(vm_id: str) -> tuple[Injection, ...]:
    return ()


class NetError(RuntimeError):
    """The host could not wire a VM or apply its policy (the old rules stay in force)."""


@dataclass(frozen=True)
class VmNetwork:
    vm_id: str
    lease: Lease
    policy: CompiledPolicy
    generation: int
    injections: tuple[Injection, ...] = ()


class NetParticipant:
    name = "network"
    kinds = frozenset({LEASE, NETNS, VETH, NFT_CHAIN, EGRESS_POLICY})
    kept_while_suspended = False

    def __init__(
        self,
        settings: Settings,
        *,
        feed: PolicyFeed | None = None,
        injections_of: InjectionSource = no_injections,
    ) -> None:
        self.settings = settings
        self.injections_of = injections_of
        self.status, plan = host_setup.probe(settings)
        self._plan = plan
        self.feed: PolicyFeed = feed or PolicyDirectory(settings.net_state_dir)
        self._installed = False
        self._lease_lock = asyncio.Lock()
        self._vm_locks: dict[str, asyncio.Lock] = {}
        self._networks: dict[str, VmNetwork] = {}
        # Leases handed out by this process and not yet released: a concurrent
        # prepare sees them before their namespaces exist.
        self._reserved: dict[int, str] = {}

    # ---- the host

    @property
    def plan(self) -> AddressPlan:
        if self._plan is None:
            raise NetError(self.status.reason)
        return self._plan

    async def start(self) -> NetStatus:
        """At server start: install Kiln's table (kept VMs' rules stay). The
        status says whether VMs get networks, and if not, why."""
        if self.status.available and not self._installed:
            try:
                await host_setup.install(self.settings, self.plan)
            except (nft.NftError, OSError) as error:
                self.status = NetStatus("off", f"cannot install Kiln's nftables table: {error}")
            else:
                self._installed = True
        return self.status

    # ---- lifecycle hooks

    async def prepare(self, vm: VmContext, launch: Launch, ledger: Ledger) -> None:
        if vm.egress is None:
            return  # no network: the card stays unwired
        await self.start()
        if not self.status.available:
            log.warning("VM %s gets no network: %s", vm.vm_id, self.status.reason)
            return
        policy = self._compile(vm.egress)  # PolicyError before anything is made
        plan = self.plan
        async with self._lease_lock:
            lease = plan.lease(await self._free_lease(ledger))
            self._reserved[lease.n] = vm.vm_id
            await ledger.record(self._resource(LEASE, vm, lease))
        await ledger.record(self._resource(NETNS, vm, lease))
        await netns.add(lease.netns)
        await ledger.record(self._resource(VETH, vm, lease))
        uid, gid = (
            (launch.confinement.uid, launch.confinement.gid)
            if launch.confinement is not None
            else (self.settings.net_tap_uid, self.settings.net_tap_uid)
        )
        await links.create(plan, lease, tap_uid=uid, tap_gid=gid, dns_port=self.settings.net_dns_port)
        await ledger.record(self._resource(NFT_CHAIN, vm, lease))
        await asyncio.to_thread(nft.run, add_vm(lease, policy, self._rules))
        network = VmNetwork(vm.vm_id, lease, policy, generation=1)
        await ledger.record(self._resource(EGRESS_POLICY, vm, lease))
        await self.feed.publish(self._egress(network))
        self._networks[vm.vm_id] = network
        fd = await links.open_tap(lease)
        launch.nic = Nic(tap_fd=fd)
        launch.owned_fds.append(fd)
        log.info("VM %s: network %s (outside %s)", vm.vm_id, lease.netns, lease.outside_address)

    async def ready(self, vm: VmContext, machine: Machine, *, restored: bool) -> None:
        network = self.network_of(vm.vm_id)
        if network is None:
            return
        # Restored guests too: a snapshot of an unwired VM has no address, and one
        # of a wired VM gets the same address again (the call is idempotent).
        # The guest's interface, route and resolver (after a restore too: the
        # guest wakes up with its source's configuration).
        await machine.agent.call("net_config", timeout=NET_CONFIG_TIMEOUT_SECONDS, **self.plan.guest_net_config())
        if vm.owner_id is not None:  # a pool VM has no vaults until it is claimed
            await self.refresh_injections(vm.vm_id, machine, trust=True)

    async def claimed(self, vm: VmContext, machine: Machine) -> None:
        if self.network_of(vm.vm_id) is None:
            return
        # A pool VM was wired with nothing allowed; now it is the user's, with its vaults.
        await self.apply_policy(vm.vm_id, vm.egress or EgressRules())
        await self.refresh_injections(vm.vm_id, machine, trust=True)

    async def trust_egress_ca(self, machine: Machine) -> None:
        """Make every common client in the guest trust the egress CA (system
        bundle and the variables Python, Node, curl and pip read; idempotent)."""
        pem = await asyncio.to_thread(read_certificate, self.settings.net_state_dir)
        await machine.agent.call("trust_ca", timeout=TRUST_CA_TIMEOUT_SECONDS, pem=pem, name=GUEST_TRUST_NAME)

    async def release(self, vm_id: str, resources: list[HostResource], ledger: Ledger) -> None:
        ours = sorted((r for r in resources if r.kind in self.kinds), key=lambda r: RELEASE_ORDER.index(r.kind))
        async with self._lease_lock:
            # Names come from leases and leases are reused: what a reconciler pass
            # saw under the VM that held a lease before may be another VM's now.
            # Those are left alone, and the leases released here stay reserved
            # until they are free, so no prepare takes one half-way.
            others = {n for n, holder in self._reserved.items() if holder != vm_id}
            ours = [r for r in ours if r.kind == EGRESS_POLICY or self._lease_number(r) not in others]
            mine = {n for r in ours if (n := self._lease_number(r)) is not None}
            for n in mine:
                self._reserved[n] = vm_id
        self._networks.pop(vm_id, None)
        try:
            for resource in ours:
                await self._remove(resource)
                await ledger.forget(resource)
        finally:
            async with self._lease_lock:
                for n in mine:
                    if self._reserved.get(n) == vm_id and not any(
                        self._lease_number(r) == n for r in await ledger.of_vm(vm_id) if r.kind in self.kinds
                    ):
                        self._reserved.pop(n, None)
        self._vm_locks.pop(vm_id, None)

    async def inventory(self) -> list[HostResource]:
        """Namespaces (and the leases they hold), host veths, VM chains and
        policy files of this prefix and table."""
        plan = self.plan
        owners = {egress.lease: egress.vm_id for egress in self.feed.published().values()}
        found: list[HostResource] = []

        def resource(kind: str, name: str, n: int) -> HostResource:
            return HostResource(kind, name, owners.get(n, ""), detail={"n": n})

        for name in netns.names():
            if (n := plan.lease_of_netns(name)) is not None:
                found.append(resource(NETNS, name, n))
                # A lease has no object of its own: it lives as long as its namespace.
                found.append(resource(LEASE, f"{plan.prefix}/{n}", n))
        for name in await links.host_links():
            if (n := plan.lease_of_veth(name)) is not None:
                found.append(resource(VETH, name.split("@")[0], n))
        table = self.settings.net_nft_table
        for obj in await asyncio.to_thread(nft.list_ruleset_of, FAMILY, table):
            chain = obj.get("chain", {}).get("name", "")
            if chain.startswith("vm") and chain.endswith("_out") and chain[2:-4].isdigit():
                found.append(resource(NFT_CHAIN, f"{table}/{chain[:-4]}", int(chain[2:-4])))
        directory = PolicyDirectory(self.settings.net_state_dir)
        for egress in self.feed.published().values():
            found.append(
                HostResource(
                    EGRESS_POLICY, str(directory.path_of(egress.vm_id)), egress.vm_id, detail={"n": egress.lease}
                )
            )
        # A lease has nothing on the host of its own: it is there while anything made for it is.
        for n in sorted({int(item.detail["n"]) for item in found}):
            found.append(resource(LEASE, f"{plan.prefix}/{n}", n))
        return found

    # ---- policies of running VMs

    def network_of(self, vm_id: str) -> VmNetwork | None:
        """The VM's network (also after a server restart: from its policy file)."""
        network = self._networks.get(vm_id)
        if network is None and self._plan is not None:
            egress = self.feed.published().get(vm_id)
            if egress is not None:
                network = VmNetwork(
                    vm_id,
                    self._plan.lease(egress.lease),
                    self._compile(egress.rules),
                    egress.generation,
                    egress.injections,
                )
                self._networks[vm_id] = network
        return network

    def policy_of(self, vm_id: str) -> EgressRules | None:
        network = self.network_of(vm_id)
        return None if network is None else network.policy.rules

    def outside_address_of(self, vm_id: str) -> str | None:
        """Where the host reaches the VM (shares): its outside address, DNATed to the guest."""
        network = self.network_of(vm_id)
        return None if network is None else network.lease.outside_address

    async def apply_policy(self, vm_id: str, rules: EgressRules) -> CompiledPolicy:
        """Make ``rules`` the running VM's policy: one nft transaction, then its
        now-forbidden flows closed and the egress daemon told (it closes its own
        connections the new policy forbids). PolicyError for a policy that cannot
        be enforced, NetError if the host refused it: either way the old rules stay."""
        lock = self._vm_locks.setdefault(vm_id, asyncio.Lock())
        async with lock:
            network = self.network_of(vm_id)
            if network is None:
                raise NetError(f"VM {vm_id} has no network")
            policy = self._compile(rules)
            await self._change(network, replace(network, policy=policy, generation=network.generation + 1))
            try:
                await conntrack.close_forbidden(network.lease.outside_address, policy.allows_address)
            except (conntrack.ConntrackError, OSError) as error:
                # The rules already refuse those flows at their next packet.
                log.warning("VM %s: cannot close flows the new policy forbids: %s", vm_id, error)
            return policy

    async def refresh_injections(self, vm_id: str, machine: Machine | None, *, trust: bool = False) -> None:
        """Make what the VM's vaults inject now (read from ``injections_of``)
        what its requests get: after a rotation, a binding or unbinding, a
        deleted service, the next request uses it. Read under the VM's lock, so
        of two refreshes the later one never applies older data. The guest is
        made to trust the egress CA before its first injection is published
        (and with ``trust``, at every ready or claim: a restored guest has its
        source's trust). NetError if the host refused it (the old one stays)."""
        lock = self._vm_locks.setdefault(vm_id, asyncio.Lock())
        async with lock:
            network = self.network_of(vm_id)
            if network is None:
                raise NetError(f"VM {vm_id} has no network")
            injections = await self.injections_of(vm_id)
            if injections and machine is not None and (trust or not network.injections):
                await self.trust_egress_ca(machine)
            if injections != network.injections:
                updated = replace(network, injections=injections, generation=network.generation + 1)
                await self._change(network, updated)

    async def _change(self, network: VmNetwork, updated: VmNetwork) -> None:
        """One nft transaction, then the feed (undone in the kernel if the feed cannot be written)."""
        vm_id = network.vm_id
        try:
            await asyncio.to_thread(nft.run, self._update(updated))
        except nft.NftError as error:
            raise NetError(f"the new egress policy of VM {vm_id} was refused: {error}") from error
        try:
            await self.feed.publish(self._egress(updated))
        except OSError as error:
            await asyncio.to_thread(nft.run, self._update(network))
            raise NetError(f"cannot store the new egress policy of VM {vm_id}: {error}") from error
        self._networks[vm_id] = updated

    def _update(self, network: VmNetwork) -> list[dict]:
        return update_vm(network.lease, network.policy, self._rules, intercepts=bool(network.injections))

    # ---- helpers

    @property
    def _rules(self) -> host_setup.HostRules:
        return host_rules(self.settings, self.plan)

    def _compile(self, rules: EgressRules) -> CompiledPolicy:
        return compile_policy(rules, blocked=self.settings.net_blocked_cidrs, never=never_reachable(self.plan))

    def _egress(self, network: VmNetwork) -> VmEgress:
        return VmEgress(
            vm_id=network.vm_id,
            lease=network.lease.n,
            outside_address=network.lease.outside_address,
            rules=network.policy.rules,
            generation=network.generation,
            injections=network.injections,
        )

    def _resource(self, kind: str, vm: VmContext, lease: Lease) -> HostResource:
        names = {
            LEASE: f"{self.plan.prefix}/{lease.n}",
            NETNS: lease.netns,
            VETH: lease.host_veth,
            NFT_CHAIN: f"{self.settings.net_nft_table}/{lease.chain_prefix}",
            EGRESS_POLICY: str(PolicyDirectory(self.settings.net_state_dir).path_of(vm.vm_id)),
        }
        detail = {"n": lease.n, "outside_address": lease.outside_address}
        return HostResource(kind, names[kind], vm.vm_id, vm.owner_id, detail=detail)

    async def _free_lease(self, ledger: Ledger) -> int:
        """The lowest lease number neither the ledger nor the host knows."""
        plan = self.plan
        used = {
            int(r.detail["n"])
            for r in await ledger.all()
            if r.kind in self.kinds and "n" in r.detail and self._is_ours(r)
        }
        used |= {int(r.detail["n"]) for r in await self.inventory()}
        used |= set(self._reserved)
        for n in range(1, plan.max_lease + 1):
            if n not in used:
                return n
        raise NetError(f"all {plan.max_lease} addresses of {plan.pool} are leased")

    def _is_ours(self, resource: HostResource) -> bool:
        prefix = self.plan.prefix
        if resource.kind == LEASE:
            return resource.name.startswith(f"{prefix}/")
        if resource.kind == NFT_CHAIN:
            return resource.name.startswith(f"{self.settings.net_nft_table}/")
        if resource.kind == EGRESS_POLICY:
            return resource.name.startswith(str(self.settings.net_state_dir))
        return resource.name.startswith(prefix)

    def _lease_number(self, resource: HostResource) -> int | None:
        lease = self._lease_of(resource)
        return None if lease is None else lease.n

    def _lease_of(self, resource: HostResource) -> Lease | None:
        plan = self.plan
        n: int | None
        if resource.kind == NETNS:
            n = plan.lease_of_netns(resource.name)
        elif resource.kind == VETH:
            n = plan.lease_of_veth(resource.name)
        else:
            raw = resource.detail.get("n")
            if raw is None and "/" in resource.name:
                raw = resource.name.rsplit("/", 1)[1].removeprefix("vm")
            n = int(raw) if raw is not None and str(raw).isdigit() else None
        return plan.lease(n) if n is not None and 1 <= n <= plan.max_lease else None

    async def _remove(self, resource: HostResource) -> None:
        if resource.kind == EGRESS_POLICY:
            if os.path.dirname(resource.name) and resource.vm_id:
                await self.feed.withdraw(resource.vm_id)
            return
        if resource.kind == LEASE:
            return  # nothing on the host: forgetting the row frees it
        lease = self._lease_of(resource)
        if lease is None:
            log.warning("cannot tell the lease of %s %s: left alone", resource.kind, resource.name)
            return
        if resource.kind == NFT_CHAIN:
            table = self.settings.net_nft_table
            present = await asyncio.to_thread(nft.list_ruleset_of, FAMILY, table)
            commands = remove_vm(table, lease, present)
            if commands:
                await asyncio.to_thread(nft.run, commands)
        elif resource.kind == VETH:
            await links.delete_link(resource.name)
        elif resource.kind == NETNS:
            await netns.delete(resource.name)
