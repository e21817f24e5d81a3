"""Fixtures for tests of guest networking with real VMs, namespaces, nftables,
the egress daemon and the outside world (``outside_world.py``).

Import them into a test module with ``from net_fixtures import *``.

- ``net_settings``: this session's own prefix, nft table, outside pool, host
  address and data dir (two sessions at once never collide);
- ``world``: the outside world, the uplink ``KILN_UPLINK`` names;
- ``egress_daemon``: the egress daemon of this session (Kiln's table installed first);
- ``network``: a ``NetParticipant`` on those settings (one per test);
- ``net_vm``: ``await net_vm(rules)``: a VM restored from the base snapshot on a
  network its participant made; after the test, the VM is destroyed and its
  network released, and nothing of it may remain.

Everything is removed at the end, pass or fail. Under ``CI=true`` a host that
cannot run these tests fails them; elsewhere they are skipped with the reason.
"""

from __future__ import annotations

import asyncio
import base64
import os
import random
import secrets
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import pytest
from outside_world import OutsideWorld, can_build_worlds

from kiln.config import Settings
from kiln.net import netns
from kiln.net import nft as nft_lib
from kiln.net.host import uninstall
from kiln.net.links import host_links
from kiln.net.participant import NetParticipant
from kiln.node.ledger import MemoryLedger
from kiln.node.participant import EgressRules, Launch, VmContext
from kiln.proxy.supervisor import EgressSupervisor
from kiln.runtime.driver import BootImage, MachineSpec, SavedState
from kiln.runtime.qemu import QemuHypervisor, QemuMachine
from kiln.runtime.snapshots import reset_identity

T = TypeVar("T")
__all__ = ["egress_daemon", "egress_settings", "net_settings", "net_vm", "network", "world"]


def require_networking() -> None:
    reason = can_build_worlds()
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


@dataclass
class Ran:
    exit_code: int
    stdout: str
    stderr: str


@dataclass
class NetVm:
    vm: VmContext
    machine: QemuMachine
    ledger: MemoryLedger
    launch: Launch = field(default_factory=Launch)

    @property
    def vm_id(self) -> str:
        return self.vm.vm_id

    async def run(self, command: str, *, stdin: str | None = None, timeout: float = 40) -> Ran:
        out, err, code = b"", b"", -1
        args: dict[str, object] = {"shell": command, "timeout": timeout}
        if stdin is not None:
            args["stdin"] = base64.b64encode(stdin.encode()).decode()
        async for frame in self.machine.agent.stream("exec", **args):  # type: ignore[arg-type]
            if frame["kind"] == "stdout":
                out += base64.b64decode(frame["data"])
            elif frame["kind"] == "stderr":
                err += base64.b64decode(frame["data"])
            elif frame["kind"] == "result":
                code = frame["value"]["exit_code"]
        return Ran(code, out.decode(errors="replace"), err.decode(errors="replace"))

    async def python(self, source: str, timeout: float = 40) -> Ran:
        return await self.run("python3 -", stdin=source, timeout=timeout)


NetVmFactory = Callable[..., Awaitable[NetVm]]
DENY_ALL = EgressRules()


# Test modules import these fixtures, and pytest then holds one "session"
# fixture per module: the world, the daemon and the settings are made once per
# session here, and removed when the session ends.
_shared: dict[str, object] = {}


def _once(request: pytest.FixtureRequest, key: str, make: Callable[[], T], close: Callable[[T], None]) -> T:
    if key not in _shared:
        made = make()
        _shared[key] = made
        request.config.add_cleanup(lambda: close(made))
    return _shared[key]  # type: ignore[return-value]


@pytest.fixture(scope="session")
def net_settings(request: pytest.FixtureRequest, vm_settings: Settings) -> Settings:
    require_networking()
    tag = secrets.token_hex(2)
    settings = vm_settings.model_copy(
        update={
            "net_prefix": f"kt{tag}",
            "net_nft_table": f"kiln_test_{tag}",
            "net_outside_pool": f"198.18.{random.randint(1, 254)}.0/24",
            "net_host_address": f"198.19.{random.randint(1, 250)}.{random.randint(1, 254)}",
            "net_dns_max_ttl": 60,
            # Its own mark: other Kiln tables on the host refuse marked packets not leaving by their uplink.
            "net_egress_mark": 0x4B490000 | int(tag, 16),
            # The world lives in TEST-NET-3: here it stands for the public internet.
            "net_blocked_cidrs": [c for c in vm_settings.net_blocked_cidrs if c != "203.0.113.0/24"],
        }
    )
    return _once(request, "settings", lambda: settings, lambda _: None)


@pytest.fixture(scope="session")
def world(request: pytest.FixtureRequest, net_settings: Settings) -> OutsideWorld:
    return _once(
        request,
        "world",
        lambda: asyncio.run(OutsideWorld.create(net_settings.net_prefix)),
        lambda made: asyncio.run(made.close()),
    )


@pytest.fixture(scope="session")
def egress_settings(net_settings: Settings, world: OutsideWorld) -> Settings:
    return net_settings.model_copy(update={"uplink": world.uplink, "dns_upstream": world.dns})


@pytest.fixture(scope="session")
def egress_daemon(request: pytest.FixtureRequest, egress_settings: Settings) -> EgressSupervisor:
    def start() -> EgressSupervisor:
        supervisor = EgressSupervisor(egress_settings)

        async def go() -> None:
            status = await NetParticipant(egress_settings).start()
            assert status.available, status.reason
            await supervisor.start()

        asyncio.run(go())
        return supervisor

    def stop(supervisor: EgressSupervisor) -> None:
        asyncio.run(supervisor.stop())
        asyncio.run(uninstall(egress_settings))
        assert_nothing_left(egress_settings)

    return _once(request, "daemon", start, stop)


def assert_nothing_left(settings: Settings) -> None:
    prefix = settings.net_prefix
    assert not [n for n in netns.names() if n.startswith(f"{prefix}ns-")]
    links = asyncio.run(host_links())
    assert not [name for name in links if name.startswith(f"{prefix}v")], links


@pytest.fixture
async def network(egress_settings: Settings, egress_daemon: EgressSupervisor) -> NetParticipant:
    participant = NetParticipant(egress_settings)
    status = await participant.start()
    assert status.available, status.reason
    return participant


@pytest.fixture
async def net_vm(
    network: NetParticipant,
    hypervisor: QemuHypervisor,
    boot_image: BootImage,
    base_snapshot: SavedState,
    egress_settings: Settings,
) -> AsyncIterator[NetVmFactory]:
    made: list[NetVm] = []
    ledger = MemoryLedger()  # one per test, as the store is one per host

    async def make(rules: EgressRules | None = DENY_ALL, *, saved: SavedState | None = None) -> NetVm:
        saved = saved or base_snapshot
        vm_id = f"n{uuid.uuid4().hex[:10]}"
        vm = VmContext(
            vm_id=vm_id, owner_id=None, vcpu_count=saved.vcpu_count, memory_mb=saved.memory_mb,
            image=boot_image, run_dir=egress_settings.vms_dir / vm_id, restore_from=saved, egress=rules,
        )  # fmt: skip
        launch = Launch()
        net = NetVm(vm, None, ledger, launch)  # type: ignore[arg-type]
        made.append(net)
        try:
            await network.prepare(vm, launch, ledger)
            spec = MachineSpec(
                vm_id=vm_id, vcpu_count=saved.vcpu_count, memory_mb=saved.memory_mb, image=boot_image,
                run_dir=vm.run_dir, restore_from=saved, **({"nic": launch.nic} if launch.nic else {}),
            )  # fmt: skip
            net.machine = await hypervisor.start(spec)
        finally:
            for fd in launch.owned_fds:  # as the pipeline does once QEMU has them
                os.close(fd)
            launch.owned_fds.clear()
        await net.machine.wait_ready(egress_settings.boot_timeout_seconds)
        await reset_identity(net.machine, vm_id)
        await network.ready(vm, net.machine, restored=True)
        return net

    try:
        yield make
    finally:
        for net in made:
            await hypervisor.destroy(net.vm_id, net.vm.run_dir)
            await network.release(net.vm_id, await net.ledger.of_vm(net.vm_id), net.ledger)
            assert await net.ledger.of_vm(net.vm_id) == []
        assert ledger.rows == {}, ledger.rows
        table = nft_lib.list_ruleset_of("inet", egress_settings.net_nft_table)
        leftovers = [o["chain"]["name"] for o in table if "chain" in o and o["chain"]["name"].startswith("vm")]
        assert leftovers == [], leftovers


@pytest.fixture
def quiet_world(world: OutsideWorld) -> OutsideWorld:
    """The world with nothing seen yet: a test that asserts nothing arrived sees
    only its own traffic, not the earlier tests' of the session."""
    world.seen.clear()
    return world
