"""Assembling this host's node: the hypervisor and the pipeline's participants,
in the order they prepare (and release in reverse), and the host daemons."""

from __future__ import annotations

from kiln.config import Settings
from kiln.net.participant import NetParticipant
from kiln.node.network import Networking
from kiln.node.node import Node
from kiln.node.participant import Ledger, Participant
from kiln.node.vm_process import VmProcess
from kiln.proxy.supervisor import EgressSupervisor
from kiln.runtime.driver import Hypervisor


def build_node(settings: Settings, hypervisor: Hypervisor, ledger: Ledger) -> Node:
    participants: list[Participant] = [VmProcess(hypervisor, settings.vms_dir)]
    networking = None
    if settings.networking != "off":
        network = NetParticipant(settings)
        # The network first: its TAP goes into the process's launch, and it is
        # released after the process is gone.
        participants.insert(0, network)
        networking = Networking(network, EgressSupervisor(settings))
    return Node(
        hypervisor, participants, ledger, boot_timeout=settings.boot_timeout_seconds, networking=networking
    )
