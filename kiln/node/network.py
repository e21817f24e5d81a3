"""The node's face of guest networking (``kiln.net``): whether VMs get networks
here, starting the egress daemon, changing a running VM's egress policy and the
credentials its vaults inject, and the daemon's record of injected calls."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from kiln.net.feed import PolicyDirectory, notify
from kiln.net.host import NetStatus
from kiln.net.participant import NetError, NetParticipant
from kiln.net.policy import PolicyError, compile_policy
from kiln.node.participant import EgressRules
from kiln.proxy.supervisor import EgressDaemonError, EgressSupervisor
from kiln.runtime.driver import Machine
from kiln.runtime.errors import AgentError
from kiln.vault.ca import CaError
from kiln.vault.journal import Call, CallJournal

log = logging.getLogger(__name__)


class EgressRefused(ValueError):
    """An egress policy that cannot be enforced (a bad domain or CIDR); ``str()`` says why."""


class EgressUnavailable(RuntimeError):
    """The host could not apply a policy (the old one stays in force), or has no networking."""


def check_rules(rules: EgressRules) -> None:
    """EgressRefused if a node could not enforce ``rules`` as written (a bad
    CIDR or name, too many). Whether this host has networking or not: a policy
    stored now may be enforced on a later start."""
    try:
        compile_policy(rules, blocked=(), never=())
    except PolicyError as error:
        raise EgressRefused(str(error)) from error


class Networking:
    def __init__(self, participant: NetParticipant, daemon: EgressSupervisor) -> None:
        self.participant = participant
        self.daemon = daemon

    @property
    def status(self) -> NetStatus:
        return self.participant.status

    @property
    def available(self) -> bool:
        return self.participant.status.available

    async def start(self) -> NetStatus:
        """At server start: Kiln's table, then the egress daemon (adopted if it
        survived the last server). Without them VMs get no network at all."""
        status = await self.participant.start()
        if status.available:
            try:
                await self.daemon.start()
            except (EgressDaemonError, OSError) as error:
                self.participant.status = NetStatus("off", f"the egress daemon did not start: {error}")
        if not self.participant.status.available:
            log.warning("guest networking is off: %s (VMs get no network at all)", self.participant.status.reason)
        return self.participant.status

    async def apply(self, vm_id: str, rules: EgressRules) -> None:
        """Make ``rules`` the running VM's policy (atomic; the old one stays on failure)."""
        check_rules(rules)
        try:
            await self.participant.apply_policy(vm_id, rules)
        except PolicyError as error:
            raise EgressRefused(str(error)) from error
        except NetError as error:
            raise EgressUnavailable(str(error)) from error

    def wired(self, vm_id: str) -> bool:
        """True when the VM has a network here (its policy can change live)."""
        return self.participant.network_of(vm_id) is not None

    def outside_address_of(self, vm_id: str) -> str | None:
        return self.participant.outside_address_of(vm_id)

    async def refresh_vaults(self, vm_id: str, machine: Machine | None) -> None:
        """The VM's vaults, as the store has them now, inject from its next request
        on (the guest is made to trust the egress CA first); EgressUnavailable if not applied."""
        try:
            await self.participant.refresh_injections(vm_id, machine)
        except (NetError, CaError, AgentError) as error:
            raise EgressUnavailable(f"the vaults of VM {vm_id} could not be applied: {error}") from error

    async def take_calls(self) -> list[tuple[Path, list[Call]]]:
        """The calls the egress daemon injected credentials into, not taken yet:
        (file, calls) pairs; remove each file once its calls are stored."""
        state_dir = self.participant.settings.net_state_dir
        # The daemon is the journal's only writer: it hands the current file over.
        await notify(PolicyDirectory(state_dir).control_socket, {"op": "rotate_calls"})

        def read() -> list[tuple[Path, list[Call]]]:
            return [(path, CallJournal.read(path)) for path in CallJournal(state_dir).taken()]

        return await asyncio.to_thread(read)
