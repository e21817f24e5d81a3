"""The QEMU ``microvm`` driver: one qemu-system-x86_64 process per VM, driven over QMP.

Everything QEMU-specific (command line, QMP, qemu-img) stays in this package,
so another hypervisor can be added behind ``kiln.runtime.driver.Hypervisor``:

    cmdline.py     the command line (pure)
    paths.py       a VM's run dir and a save's directory
    process.py     QEMU processes: liveness, signals, finding them
    qmp.py         the QMP connection and migration commands (through fds)
    disks.py       qcow2 overlays, the disk switch of a save, flattening
    machine.py     QemuMachine: one running VM
    saving.py      save, restore, and settling a save a crash cut short
    hypervisor.py  QemuHypervisor: start, adopt, destroy, save, the KVM probe

Each VM owns a run dir (``settings.vms_dir/<vm_id>/``)::

    overlay.qcow2   the VM's writable disk, backed by the image's read-only rootfs
    agent.sock      QEMU's end of the virtio-serial port of the guest agent
    qmp.sock        QMP
    console.log     the guest's serial console (kept after a failure: it says why)
    qemu.log        QEMU's own stdout/stderr
    qemu.pid        written by QEMU
    machine.json    the spec the VM was started with, so a restarted server can adopt it

QEMU runs in its own process session, so it outlives a restart of the server,
which later finds it again with ``adopt``.
"""

from kiln.runtime.qemu.cmdline import QEMU_BINARY
from kiln.runtime.qemu.disks import QEMU_IMG
from kiln.runtime.qemu.hypervisor import QemuHypervisor
from kiln.runtime.qemu.machine import QemuMachine
from kiln.runtime.qemu.qmp import QemuError

__all__ = ["QEMU_BINARY", "QEMU_IMG", "QemuError", "QemuHypervisor", "QemuMachine"]
