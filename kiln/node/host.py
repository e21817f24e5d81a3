"""Assembling this host's node: the hypervisor and the pipeline's participants,
in the order they prepare (and release in reverse), and the host daemons."""

from __future__ import annotations

from kiln.config import Settings
from kiln.net.participant import InjectionSource, NetParticipant, no_injections
from kiln.node.confinement import ConfinementParticipant
from kiln.node.network import Networking
from kiln.node.node import Node
from kiln.node.participant import Ledger, Participant
from kiln.node.vm_process import VmProcess
from kiln.proxy.supervisor import EgressSupervisor
from kiln.runtime.driver import Hypervisor


def build_node(
    settings: Settings, hypervisor: Hypervisor, ledger: Ledger, injections_of: InjectionSource = no_injections
) -> Node:
    """``injections_of``: the credentials a VM's vaults inject (from the store)."""
    # Confinement first (the others see the user QEMU runs as), then the
    # network (its TAP goes into the process's launch), then the process;
    # released in reverse: the cgroup goes once the process is gone.
    confinement = ConfinementParticipant(settings, hypervisor) if settings.confinement != "off" else None
    participants: list[Participant] = [confinement] if confinement is not None else []
    networking = None
    if settings.networking != "off":
        network = NetParticipant(settings, injections_of=injections_of)
        participants.append(network)
        networking = Networking(network, EgressSupervisor(settings))
    participants.append(VmProcess(hypervisor, settings.vms_dir))
    return Node(
        hypervisor,
        participants,
        ledger,
        boot_timeout=settings.boot_timeout_seconds,
        networking=networking,
        confinement=confinement,
    )
