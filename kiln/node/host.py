"""Assembling this host's node: the hypervisor and the pipeline's participants,
in the order they prepare (and release in reverse), and the host daemons."""

from __future__ import annotations

from kiln.config import Settings
from kiln.net.participant import InjectionSource, NetParticipant, no_injections
from kiln.node.confinement import ConfinementParticipant
from kiln.node.machines import MachineRegistry
from kiln.node.network import Networking
from kiln.node.node import Node
from kiln.node.participant import Ledger, Participant
from kiln.node.vm_process import VmProcess
from kiln.node.volumes import NodeVolumes
from kiln.proxy.supervisor import EgressSupervisor
from kiln.runtime.driver import Hypervisor
from kiln.volumes import VolumeParticipant, Volumes


def build_node(
    settings: Settings, hypervisor: Hypervisor, ledger: Ledger, injections_of: InjectionSource = no_injections
) -> Node:
    """``injections_of``: the credentials a VM's vaults inject (from the store)."""
    # Confinement first (the others see the user QEMU runs as), then the
    # network (its TAP goes into the process's launch), then the process,
    # then volumes (their drives go into its launch, and they are released
    # while it still runs: the guest unmounts cleanly); released in reverse:
    # the cgroup goes once the process is gone.
    confinement = ConfinementParticipant(settings, hypervisor) if settings.confinement != "off" else None
    participants: list[Participant] = [confinement] if confinement is not None else []
    networking = None
    if settings.networking != "off":
        network = NetParticipant(settings, injections_of=injections_of)
        participants.append(network)
        networking = Networking(network, EgressSupervisor(settings))
    participants.append(VmProcess(hypervisor, settings.vms_dir))
    machines = MachineRegistry()
    # A confined QEMU opens volume files as the VMs' user: they are given to it.
    volumes = Volumes(
        settings, machines=machines.get, vm_owner=lambda: confinement.vm_owner if confinement else None
    )
    volume_participant = VolumeParticipant(volumes, ledger)
    participants.append(volume_participant)
    return Node(
        hypervisor,
        participants,
        ledger,
        boot_timeout=settings.boot_timeout_seconds,
        networking=networking,
        confinement=confinement,
        machines=machines,
        volumes=NodeVolumes(volumes, volume_participant, machines),
    )
