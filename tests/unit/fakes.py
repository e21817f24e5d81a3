"""Test doubles of the runtime: a hypervisor, its machines and agents, an image store.

They keep the service layer's tests fast and QEMU-free. A ``FakeHypervisor``
outlives the apps that use it, as QEMU processes outlive a kiln server, so a
test can restart the app and watch it adopt the "processes".
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.runtime.driver import BootImage, MachineSpec, SavedState, SaveOutcome, SaveRecovery
from kiln.runtime.errors import AgentError, BootError, RuntimeFailure


@dataclass
class FakeAgent:
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    # op name -> exception that call raises
    failures: dict[str, Exception] = field(default_factory=dict)
    misbehaving: str | None = None
    in_flight: int = 0

    async def call(self, op: str, timeout: float | None = None, **args: Any) -> dict[str, Any]:
        self.calls.append((op, args))
        if op in self.failures:
            raise self.failures[op]
        return {}


@dataclass
class FakeMachine:
    vm_id: str
    pid: int
    run_dir: Path
    spec: MachineSpec
    fake_agent: FakeAgent
    # When set, wait_ready blocks until it is set (to observe the creating state).
    ready_gate: asyncio.Event | None = None
    # Raised by wait_ready, as QemuMachine raises BootError for a guest that never answers.
    ready_error: Exception | None = None
    alive: bool = True
    connections_closed: bool = False

    @property
    def agent(self) -> FakeAgent:
        return self.fake_agent

    async def wait_ready(self, timeout: float) -> dict[str, Any]:
        if self.ready_gate is not None:
            await asyncio.wait_for(self.ready_gate.wait(), timeout)
        if self.ready_error is not None:
            raise self.ready_error
        return {}

    async def close_connections(self) -> None:
        self.connections_closed = True


class FakeHypervisor:
    accel = "tcg"

    def __init__(self) -> None:
        self.machines: dict[str, FakeMachine] = {}
        self.destroyed: list[str] = []
        self.grown: dict[str, int] = {}  # vm_id -> the size its root disk was grown to
        self.start_error: Exception | None = None
        # Behaviour of the next machines started.
        self.agent_failures: dict[str, Exception] = {}
        self.ready_gate: asyncio.Event | None = None
        self.ready_error: Exception | None = None
        self._pids = itertools.count(1000)

    async def start(self, spec: MachineSpec) -> FakeMachine:
        spec.run_dir.mkdir(parents=True, exist_ok=True)
        (spec.run_dir / "console.log").write_text(f"booting {spec.vm_id}\n")
        if self.start_error is not None:
            raise self.start_error
        machine = FakeMachine(
            vm_id=spec.vm_id,
            pid=next(self._pids),
            run_dir=spec.run_dir,
            spec=spec,
            fake_agent=FakeAgent(failures=dict(self.agent_failures)),
            ready_gate=self.ready_gate,
            ready_error=self.ready_error,
        )
        self.machines[spec.vm_id] = machine
        return machine

    async def adopt(self, vm_id: str, run_dir: Path) -> FakeMachine | None:
        machine = self.machines.get(vm_id)
        return machine if machine is not None and machine.alive else None

    def is_running(self, machine: FakeMachine) -> bool:  # type: ignore[override]
        return machine.alive

    async def destroy(self, vm_id: str, run_dir: Path) -> None:
        machine = self.machines.pop(vm_id, None)
        if machine is not None:
            machine.alive = False
        self.destroyed.append(vm_id)
        shutil.rmtree(run_dir, ignore_errors=True)

    def running_ids(self) -> set[str]:
        return {vm_id for vm_id, machine in self.machines.items() if machine.alive}

    async def decide_accel(self, image: BootImage) -> str:
        return self.accel

    def saved_state(self, directory: Path) -> SavedState:
        raise RuntimeFailure(f"no saved VM state in {directory} (the fake saves nothing)")

    async def save(self, machine: FakeMachine, directory: Path, *, keep_running: bool = True) -> SavedState:
        raise RuntimeFailure("the fake hypervisor cannot save")

    async def recover_save(
        self, machine: FakeMachine | None, run_dir: Path, directory: Path, *, keep_running: bool
    ) -> SaveRecovery:
        shutil.rmtree(directory, ignore_errors=True)
        return SaveRecovery(SaveOutcome.UNDONE if machine is not None else SaveOutcome.LOST)

    def disk_growth_left(self, machine: FakeMachine) -> int:
        return 0

    async def grow_root_disk(self, machine: FakeMachine, size_bytes: int) -> None:
        self.grown[machine.vm_id] = size_bytes

    def cap_console(self, run_dir: Path) -> bool:
        return False

    def console_tail(self, run_dir: Path, max_bytes: int) -> str:
        try:
            return (run_dir / "console.log").read_text()[-max_bytes:]
        except OSError:
            return ""

    def running_under(self, directory: Path) -> dict[int, Path]:
        return {
            machine.pid: machine.run_dir.resolve()
            for machine in self.machines.values()
            if machine.alive and machine.run_dir.resolve().parent == directory.resolve()
        }


class FakeImageStore:
    def __init__(self, root: Path, built: tuple[str, ...] = ("default",)) -> None:
        self.root = root
        self.built = set(built)

    def variants(self) -> list[str]:
        return sorted({"default", "minimal"} | self.built)

    def get(self, variant: str) -> BootImage | None:
        if variant not in self.built:
            return None
        return BootImage(
            variant=variant,
            kernel=self.root / "vmlinuz",
            initrd=self.root / "initrd",
            rootfs=self.root / "rootfs.ext4",
            cmdline="console=ttyS0",
        )


def agent_error(message: str = "bad env") -> AgentError:
    return AgentError("EINVAL", message)


def boot_error(message: str = "qemu exited during boot") -> BootError:
    return BootError(message)
