"""Assembling this host's node: the hypervisor and the pipeline's participants,
in the order they prepare (and release in reverse)."""

from __future__ import annotations

from kiln.config import Settings
from kiln.node.node import Node
from kiln.node.participant import Ledger, Participant
from kiln.node.vm_process import VmProcess
from kiln.runtime.driver import Hypervisor


def build_node(settings: Settings, hypervisor: Hypervisor, ledger: Ledger) -> Node:
    participants: list[Participant] = [VmProcess(hypervisor, settings.vms_dir)]
    return Node(hypervisor, participants, ledger, boot_timeout=settings.boot_timeout_seconds)
