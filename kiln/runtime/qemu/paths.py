"""Where a VM's files are: its run dir, and the directory of a save."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107


@dataclass(frozen=True)
class RunPaths:
    """The files of one VM's run dir (``settings.vms_dir/<vm_id>/``)."""

    root: Path

    @property
    def overlay(self) -> Path:
        """The disk the VM starts on: a qcow2 overlay over the image or a save."""
        return self.layer(0)

    def layer(self, generation: int) -> Path:
        """The VM's writable disk after ``generation`` saves that kept it running.

        Each save switches the VM to a new file and freezes the old one; no file
        the VM has open is ever renamed, because QEMU reopens a node by the name
        it was opened with (a save reopens the old top read-only)."""
        return self.root / ("overlay.qcow2" if generation == 0 else f"overlay.{generation}.qcow2")

    def layers(self) -> list[Path]:
        """The layer files in the run dir, oldest first."""
        found = []
        for path in self.root.glob("overlay*.qcow2"):
            middle = path.name.removeprefix("overlay").removesuffix(".qcow2")
            if middle == "" or (middle.startswith(".") and middle[1:].isdigit()):
                found.append((int(middle[1:] or 0), path))
        return [path for _, path in sorted(found)]

    def top(self) -> Path:
        """The newest layer file (the VM's writable disk once no save is under way)."""
        layers = self.layers()
        return layers[-1] if layers else self.overlay

    @property
    def agent_socket(self) -> Path:
        return self.root / "agent.sock"

    @property
    def qmp_socket(self) -> Path:
        return self.root / "qmp.sock"

    @property
    def console_log(self) -> Path:
        return self.root / "console.log"

    @property
    def qemu_log(self) -> Path:
        return self.root / "qemu.log"

    @property
    def pid_file(self) -> Path:
        return self.root / "qemu.pid"

    @property
    def machine_file(self) -> Path:
        return self.root / "machine.json"

    @property
    def memory_file(self) -> Path:
        """Guest RAM, for a VM started with ``memory_in_file``."""
        return self.root / "memory.ram"

    def everything_but_the_console(self) -> list[Path]:
        return [
            self.memory_file,
            *self.layers(),
            self.agent_socket,
            self.qmp_socket,
            self.qemu_log,
            self.pid_file,
            self.machine_file,
        ]


@dataclass(frozen=True)
class SavedPaths:
    """The files of one save's directory, all read-only once written::

        state.json    what a restore must match (shape, accelerator); written
                      last, so a directory without it holds no finished save
        state.pending the same, while a save that stops the VM finishes (its
                      stream is complete; the disk may still have to move in)
        vmstate       QEMU's migration stream: device state, plus the guest RAM
                      unless the RAM is memory.ram
        memory.ram    the guest RAM as a flat file (saves of VMs started with memory_in_file)
        disk.qcow2    the frozen disk; its backing file is the image's rootfs or
                      an earlier save's disk
    """

    root: Path

    @property
    def description(self) -> Path:
        return self.root / "state.json"

    @property
    def pending_description(self) -> Path:
        return self.root / "state.pending"

    @property
    def vmstate(self) -> Path:
        return self.root / "vmstate"

    @property
    def memory(self) -> Path:
        return self.root / "memory.ram"

    @property
    def disk(self) -> Path:
        return self.root / "disk.qcow2"
