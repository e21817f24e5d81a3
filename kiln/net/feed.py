"""How a VM's egress policy reaches the egress daemon.

The node side writes one JSON file per VM into ``KILN_DATA_DIR/net/policies/``
(0700; each file 0600, replaced atomically by rename) and then tells the
daemon over its control socket (``net/egress.sock``) to reload that VM, waiting
for its answer. The files are the truth: a daemon that starts (or restarts)
reads them all, and it rescans them every second in case a notice was lost.

``PolicyFeed`` is the interface the participant writes through, so the store
may take the files' place later without touching either side.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from kiln.net.policy import rules_from_json, rules_to_json
from kiln.node.participant import EgressRules
from kiln.vault.binding import Injection

POLICY_DIR = "policies"
CONTROL_SOCKET = "egress.sock"
CONTROL_TIMEOUT_SECONDS = 2.0
MAX_CONTROL_LINE = 64 * 1024


@dataclass(frozen=True)
class VmEgress:
    """What the daemon needs of one VM: who it is on the wire, its rules, and
    the credentials its vaults inject (values sealed: only the daemon opens them)."""

    vm_id: str
    lease: int
    outside_address: str
    rules: EgressRules
    generation: int = 0
    injections: tuple[Injection, ...] = ()

    def to_json(self) -> dict[str, object]:
        return {
            "vm_id": self.vm_id,
            "lease": self.lease,
            "outside_address": self.outside_address,
            "rules": rules_to_json(self.rules),
            "generation": self.generation,
            "injections": [injection.to_json() for injection in self.injections],
        }

    @classmethod
    def from_json(cls, data: dict[str, object]) -> VmEgress:
        rules = data.get("rules")
        if not isinstance(rules, dict):
            raise TypeError("policy file without rules")
        injections = data.get("injections") or []  # absent in files of servers without vaults
        if not isinstance(injections, list):
            raise TypeError("injections must be a list")
        return cls(
            vm_id=str(data["vm_id"]),
            lease=int(data["lease"]),  # type: ignore[call-overload]
            outside_address=str(data["outside_address"]),
            rules=rules_from_json(rules),
            generation=int(data.get("generation", 0)),  # type: ignore[call-overload]
            injections=tuple(Injection.from_json(item) for item in injections),
        )


class PolicyFeed(Protocol):
    async def publish(self, egress: VmEgress) -> None:
        """Make ``egress`` the VM's policy for the daemon (durably), then tell it."""
        ...

    async def withdraw(self, vm_id: str) -> None:
        """The VM has no network any more; idempotent."""
        ...

    def published(self) -> dict[str, VmEgress]:
        """Every VM's policy as published (vm_id -> policy)."""
        ...


class PolicyDirectory:
    """The file-based feed (see the module docstring)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.directory = state_dir / POLICY_DIR
        self.control_socket = state_dir / CONTROL_SOCKET

    def ensure(self) -> None:
        for directory in (self.state_dir, self.directory):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            directory.chmod(0o700)

    def path_of(self, vm_id: str) -> Path:
        if not vm_id or "/" in vm_id or vm_id.startswith("."):
            raise ValueError(f"bad vm id {vm_id!r}")
        return self.directory / f"{vm_id}.json"

    def write(self, egress: VmEgress) -> None:
        self.ensure()
        target = self.path_of(egress.vm_id)
        fd, temporary = tempfile.mkstemp(dir=self.directory, prefix=".", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as file:
                json.dump(egress.to_json(), file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            raise

    def remove(self, vm_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path_of(vm_id).unlink()

    def published(self) -> dict[str, VmEgress]:
        found: dict[str, VmEgress] = {}
        try:
            entries = list(self.directory.glob("*.json"))
        except FileNotFoundError:
            return found
        for path in entries:
            try:
                egress = VmEgress.from_json(json.loads(path.read_text()))
            except (OSError, ValueError, KeyError, TypeError):
                continue  # half-written files are never renamed in; a broken one is skipped
            found[egress.vm_id] = egress
        return found

    async def publish(self, egress: VmEgress) -> None:
        self.write(egress)
        await notify(self.control_socket, {"op": "reload", "vm_id": egress.vm_id})

    async def withdraw(self, vm_id: str) -> None:
        self.remove(vm_id)
        await notify(self.control_socket, {"op": "reload", "vm_id": vm_id})


async def request(socket_path: Path, message: dict[str, object], timeout: float = CONTROL_TIMEOUT_SECONDS) -> dict:
    """One request to the daemon's control socket: a JSON line out, a JSON line back."""

    async def exchange() -> dict:
        reader, writer = await asyncio.open_unix_connection(str(socket_path), limit=MAX_CONTROL_LINE)
        try:
            writer.write(json.dumps(message).encode() + b"\n")
            await writer.drain()
            line = await reader.readline()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        answer: dict = json.loads(line or b"{}")
        return answer

    return await asyncio.wait_for(exchange(), timeout)


async def notify(socket_path: Path, message: dict[str, object]) -> bool:
    """Tell the daemon; False when it is not running (it reads the files when it starts)."""
    try:
        answer = await request(socket_path, message)
    except (OSError, TimeoutError, ValueError):
        return False
    return bool(answer.get("ok"))
