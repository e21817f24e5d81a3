"""One cgroup per VM: a memory limit, a pids limit and a CPU weight for its QEMU.

cgroup v2 where the unified hierarchy has the controllers, else v1's
``memory``, ``cpu`` and ``pids`` hierarchies under ``/sys/fs/cgroup/<controller>``
(these machines: their cgroup2 at ``/sys/fs/cgroup/unified`` carries no memory
controller). A VM's cgroup is ``<the server's own cgroup>/<parent>/<vm_id>``
in each hierarchy: nested under the server's, so whatever limits the server
(a container, a systemd slice) limits its VMs too.

The QEMU process joins before it executes QEMU (its ``cgroup.procs`` files are
written by the child between fork and exec), so no guest page is ever charged
elsewhere.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
V1_CONTROLLERS = ("memory", "cpu", "pids")
V2_CONTROLLERS = ("memory", "cpu", "pids")


@dataclass(frozen=True)
class Limits:
    memory_bytes: int
    pids: int
    # Relative CPU share: proportional to the VM's vCPUs.
    cpu_weight: int


@dataclass(frozen=True)
class CgroupLayout:
    """Where VM cgroups live on this host, or why they cannot."""

    version: int  # 1, 2, or 0: none usable
    # The directory VM cgroups are made in, per controller (v2: one, under "unified").
    parents: dict[str, Path]
    reason: str = ""

    @property
    def usable(self) -> bool:
        return self.version != 0


def _own_cgroup(controller: str | None) -> str:
    """The server's own cgroup path in a v1 controller's hierarchy (None: v2)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return "/"
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controller is None and controllers == "":
            return path
        if controller is not None and controller in controllers.split(","):
            return path
    return "/"


def discover(parent_name: str, root: Path = CGROUP_ROOT) -> CgroupLayout:
    """The cgroup hierarchy this host offers for VMs."""
    unified = root / "cgroup.controllers"
    if unified.is_file():
        available = set(unified.read_text().split())
        if set(V2_CONTROLLERS) <= available:
            base = root / _own_cgroup(None).lstrip("/")
            return CgroupLayout(2, {"unified": base / parent_name})
    parents: dict[str, Path] = {}
    for controller in V1_CONTROLLERS:
        mount = root / controller
        if not (mount / "cgroup.procs").is_file():
            return CgroupLayout(0, {}, f"no cgroup v1 {controller} hierarchy at {mount} and no cgroup v2 with it")
        parents[controller] = mount / _own_cgroup(controller).lstrip("/") / parent_name
    return CgroupLayout(1, parents)


class VmCgroups:
    """Makes, limits, lists and removes the VMs' cgroups of one layout."""

    def __init__(self, layout: CgroupLayout) -> None:
        self.layout = layout

    def paths(self, name: str) -> list[Path]:
        return [parent / name for parent in self.layout.parents.values()]

    def procs_files(self, name: str) -> tuple[Path, ...]:
        return tuple(path / "cgroup.procs" for path in self.paths(name))

    def create(self, name: str, limits: Limits) -> None:
        """Make the VM's cgroup(s) with its limits (blocking; idempotent)."""
        if self.layout.version == 2:
            self._enable_v2_controllers()
            path = self.layout.parents["unified"] / name
            path.mkdir(parents=True, exist_ok=True)
            _write(path / "memory.max", str(limits.memory_bytes))
            _write(path / "memory.swap.max", "0", optional=True)
            _write(path / "pids.max", str(limits.pids))
            _write(path / "cpu.weight", str(max(1, min(limits.cpu_weight // 10, 10_000))))
            return
        for controller, parent in self.layout.parents.items():
            path = parent / name
            path.mkdir(parents=True, exist_ok=True)
            if controller == "memory":
                _write(path / "memory.limit_in_bytes", str(limits.memory_bytes))
            elif controller == "pids":
                _write(path / "pids.max", str(limits.pids))
            elif controller == "cpu":
                _write(path / "cpu.shares", str(limits.cpu_weight))

    def remove(self, name: str) -> bool:
        """Remove the VM's cgroup(s); False if a process is still in one (EBUSY)."""
        removed = True
        for path in self.paths(name):
            try:
                path.rmdir()
            except FileNotFoundError:
                continue
            except OSError as error:
                if error.errno != errno.EBUSY:
                    raise
                removed = False
        return removed

    def names(self) -> set[str]:
        """The VM cgroups that exist now (in any hierarchy)."""
        found: set[str] = set()
        for parent in self.layout.parents.values():
            with contextlib.suppress(OSError):
                found |= {entry.name for entry in parent.iterdir() if entry.is_dir()}
        return found

    def members(self, name: str) -> set[int]:
        pids: set[int] = set()
        for procs in self.procs_files(name):
            with contextlib.suppress(OSError):
                pids |= {int(line) for line in procs.read_text().split()}
        return pids

    def memory_limit(self, name: str) -> int | None:
        """The memory limit in force (bytes), for tests and diagnostics."""
        for path in self.paths(name):
            for file in ("memory.limit_in_bytes", "memory.max"):
                with contextlib.suppress(OSError, ValueError):
                    return int((path / file).read_text().strip())
        return None

    def _enable_v2_controllers(self) -> None:
        parent = self.layout.parents["unified"]
        parent.mkdir(parents=True, exist_ok=True)
        # Each level down to the parent must hand the controllers on.
        for level in (parent.parent, parent):
            wanted = " ".join(f"+{controller}" for controller in V2_CONTROLLERS)
            _write(level / "cgroup.subtree_control", wanted, optional=True)


def _write(path: Path, value: str, *, optional: bool = False) -> None:
    try:
        path.write_text(value)
    except OSError as error:
        if not optional:
            raise
        log.debug("cgroup: cannot write %s to %s: %s", value, path, error)


def join(procs_files: tuple[Path, ...]) -> None:
    """Move the calling process into these cgroups (in a child before exec:
    only system calls, no allocation-heavy Python)."""
    pid = str(os.getpid()).encode()
    for procs in procs_files:
        fd = os.open(procs, os.O_WRONLY)
        try:
            os.write(fd, pid)
        finally:
            os.close(fd)
