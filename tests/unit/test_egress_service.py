"""Changing a VM's egress policy: what is applied, what is stored, and when.

The node's networking is faked here (the real one needs root and nftables:
``tests/integration/test_egress_api.py``); the fake records what it was asked
to apply and can refuse or fail as the real one does.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import update
from unit.fakes import FakeHypervisor, FakeImageStore

from kiln.config import Settings
from kiln.net.host import NetStatus
from kiln.node.network import EgressUnavailable
from kiln.node.participant import EgressRules
from kiln.schemas.vms import VMCreateRequest
from kiln.services.egress import EgressService
from kiln.services.errors import Conflict, InvalidRequest, NotFound
from kiln.services.users import UserService
from kiln.services.vms import VmService
from kiln.services.wiring import build_vm_services
from kiln.store.db import Database
from kiln.store.models import Vm

RAW = {"allowed_cidrs": ["203.0.113.5/32"]}
WEB = {"allowed_domains": ["example.com"], "allow_https": True}


@dataclass
class FakeNetworking:
    """``kiln.node.network.Networking`` as the egress service uses it."""

    hypervisor: FakeHypervisor
    status: NetStatus = field(default_factory=lambda: NetStatus("filtered"))
    applied: list[tuple[str, EgressRules]] = field(default_factory=list)
    failure: Exception | None = None
    gate: asyncio.Event | None = None

    @property
    def available(self) -> bool:
        return self.status.available

    async def apply(self, vm_id: str, rules: EgressRules) -> None:
        if self.gate is not None:
            await self.gate.wait()
        if self.failure is not None:
            raise self.failure
        self.applied.append((vm_id, rules))

    def wired(self, vm_id: str) -> bool:
        # VMs get networks while the host has networking (the status is not changed under them here).
        return self.available and vm_id in self.hypervisor.running_ids()


@dataclass
class World:
    vms: VmService
    egress: EgressService
    networking: FakeNetworking
    db: Database
    alice: int
    bob: int

    async def create(self, **fields: Any) -> Vm:
        return await self.vms.create(self.alice, VMCreateRequest.model_validate(fields), wait=True)

    async def row(self, vm_id: str) -> Vm:
        return await self.vms.reload(vm_id)

    async def force_status(self, vm_id: str, status: str) -> None:
        async with self.db.transaction() as session:
            await session.execute(update(Vm).where(Vm.id == vm_id).values(status=status))


@pytest.fixture
async def world(
    settings: Settings, db: Database, hypervisor: FakeHypervisor, images: FakeImageStore
) -> AsyncIterator[World]:
    users = UserService(db)
    alice = await users.create_user("alice")
    bob = await users.create_user("bob")
    vms = build_vm_services(settings, db, hypervisor, images).vms
    networking = FakeNetworking(hypervisor)
    vms.node.networking = networking  # type: ignore[assignment]
    yield World(vms, EgressService(vms), networking, db, alice.id, bob.id)
    await vms.stop()


async def test_a_change_is_applied_then_stored(world: World) -> None:
    vm = await world.create(egress_policy=RAW)
    assert (await world.egress.of_vm(world.alice, vm.id)).status == "applied"

    state = await world.egress.set_for_vm(world.alice, vm.id, {**WEB, "allow_public_repos": True})

    domains = world.vms.egress.package_manager_domains
    assert world.networking.applied == [
        (vm.id, EgressRules(allowed_domains=("example.com",), allow_https=True, web_domains=domains))
    ]
    assert state.status == "applied"
    assert (
        state.policy
        == (await world.row(vm.id)).egress_policy
        == {
            "allow_package_managers": True,
            "allow_http": False,
            "allow_https": True,
            "allowed_domains": ["example.com"],
            "allowed_cidrs": [],
        }
    )
    # The session's route reaches the same VM.
    assert (await world.egress.of_session(world.alice, vm.session_id)).policy == state.policy
    await world.egress.set_for_session(world.alice, vm.session_id, {})
    assert world.networking.applied[-1] == (vm.id, EgressRules())


async def test_a_change_the_host_cannot_apply_keeps_the_old_policy(world: World) -> None:
    vm = await world.create(egress_policy=RAW)
    world.networking.failure = EgressUnavailable("nft said no")
    with pytest.raises(Conflict, match="the old one stays: nft said no"):
        await world.egress.set_for_vm(world.alice, vm.id, WEB)
    assert (await world.row(vm.id)).egress_policy["allowed_cidrs"] == RAW["allowed_cidrs"]


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"allowed_cidrs": ["2001:db8::/32"]}, ("allowed_cidrs",)),
        ({"allowed_domains": ["bad name"], "allow_http": True}, ("allowed_domains",)),
        ({"allow_package_managers": True, "allow_public_repos": False}, ("allow_public_repos",)),
        ({"surprise": True}, ("surprise",)),
    ],
)
async def test_a_policy_that_cannot_be_enforced_is_refused_before_anything(
    world: World, body: dict[str, Any], loc: tuple[str, ...]
) -> None:
    vm = await world.create(egress_policy=RAW)
    with pytest.raises(InvalidRequest) as error:
        await world.egress.set_for_vm(world.alice, vm.id, body)
    assert [problem.loc for problem in error.value.problems] == [loc]
    assert world.networking.applied == []
    assert (await world.row(vm.id)).egress_policy["allowed_cidrs"] == RAW["allowed_cidrs"]


async def test_another_users_vm_or_session_is_not_found(world: World) -> None:
    vm = await world.create()
    for call in (
        world.egress.of_vm(world.bob, vm.id),
        world.egress.set_for_vm(world.bob, vm.id, RAW),
        world.egress.of_session(world.bob, vm.session_id),
        world.egress.set_for_session(world.bob, vm.session_id, RAW),
    ):
        with pytest.raises(NotFound):
            await call
    assert world.networking.applied == []


async def test_a_suspended_vm_stores_the_policy_for_its_resume(world: World) -> None:
    vm = await world.create()
    await world.force_status(vm.id, "suspended")

    state = await world.egress.set_for_vm(world.alice, vm.id, RAW)

    assert world.networking.applied == []  # nothing runs: nothing to apply now
    assert state.status == "pending"
    assert (await world.row(vm.id)).egress_policy["allowed_cidrs"] == RAW["allowed_cidrs"]
    # What a resume builds its network from.
    context = world.vms.context(await world.row(vm.id), None, None)  # type: ignore[arg-type]
    assert context.egress == EgressRules(allowed_cidrs=("203.0.113.5/32",))


@pytest.mark.parametrize("status", ["suspending", "terminating", "terminated", "failed"])
async def test_other_states_refuse_a_change(world: World, status: str) -> None:
    vm = await world.create(egress_policy=RAW)
    await world.force_status(vm.id, status)
    with pytest.raises(Conflict, match=f"is {status}"):
        await world.egress.set_for_vm(world.alice, vm.id, WEB)
    expected = "pending" if status == "suspending" else "ended"
    assert (await world.egress.of_vm(world.alice, vm.id)).status == expected


async def test_a_change_during_the_create_waits_for_the_vm(world: World, hypervisor: FakeHypervisor) -> None:
    hypervisor.ready_gate = asyncio.Event()
    vm = await world.vms.create(world.alice, VMCreateRequest(), wait=False)
    change = asyncio.create_task(world.egress.set_for_vm(world.alice, vm.id, RAW))
    await asyncio.sleep(0.05)
    assert not change.done() and world.networking.applied == []
    hypervisor.ready_gate.set()
    state = await change
    assert state.status == "applied" and world.networking.applied == [
        (vm.id, EgressRules(allowed_cidrs=("203.0.113.5/32",)))
    ]


async def test_changes_of_one_vm_apply_and_store_in_order(world: World) -> None:
    vm = await world.create()
    world.networking.gate = asyncio.Event()
    first = asyncio.create_task(world.egress.set_for_vm(world.alice, vm.id, RAW))
    second = asyncio.create_task(world.egress.set_for_vm(world.alice, vm.id, WEB))
    await asyncio.sleep(0.05)
    world.networking.gate.set()
    await asyncio.gather(first, second)
    assert [rules.allowed_cidrs for _, rules in world.networking.applied] == [("203.0.113.5/32",), ()]
    assert (await world.row(vm.id)).egress_policy["allowed_domains"] == ["example.com"]


async def test_a_change_applied_while_a_suspend_begins_is_stored_for_its_resume(world: World) -> None:
    vm = await world.create(egress_policy=RAW)
    world.networking.gate = asyncio.Event()
    change = asyncio.create_task(world.egress.set_for_vm(world.alice, vm.id, WEB))
    await asyncio.sleep(0.05)
    await world.force_status(vm.id, "suspending")  # a suspend began while the rules were applied
    world.networking.gate.set()
    state = await change
    assert len(world.networking.applied) == 1
    assert state.status == "pending" and (await world.row(vm.id)).egress_policy["allowed_domains"] == ["example.com"]


async def test_without_networking_a_vm_that_asks_for_egress_says_it_has_none(world: World) -> None:
    world.networking.status = NetStatus("off", "kiln does not run as root: VMs get no network")
    quiet = await world.create()
    asking = await world.create(egress_policy=RAW, session_id="asking")
    assert quiet.network_error is None
    assert asking.network_error == (
        "the host gives VMs no network, so this VM reaches nothing: kiln does not run as root: VMs get no network"
    )
    # Its card is unwired: the pipeline was given no rules at all.
    assert world.vms.context(asking, None, None).egress is None  # type: ignore[arg-type]

    state = await world.egress.set_for_vm(world.alice, quiet.id, WEB)
    assert world.networking.applied == []
    assert state.status == "no_network"
    assert state.vm.network_error is not None and "not run as root" in state.vm.network_error
    back = await world.egress.set_for_vm(world.alice, quiet.id, {})
    assert back.vm.network_error is None


def test_healthz_details(world: World) -> None:
    assert world.vms.node.health()["networking"] == {"mode": "filtered", "reason": None}
    world.networking.status = NetStatus("off", "no /dev/net/tun: VMs get no network")
    assert world.vms.node.health()["networking"] == {"mode": "off", "reason": "no /dev/net/tun: VMs get no network"}
