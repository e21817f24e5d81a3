"""The VM service with a fake runtime: state machine, policy, admission, loops, tenancy."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import update
from unit.fakes import FakeHypervisor, FakeImageStore, agent_error, boot_error

from kiln.config import Settings
from kiln.schemas.vms import VMCreateRequest, VMUpdateRequest
from kiln.services.activity import Activity
from kiln.services.errors import (
    CapacityExhausted,
    Conflict,
    ImageNotBuilt,
    InvalidRequest,
    NotFound,
    VmStartFailed,
)
from kiln.services.memory_pressure import MemoryFloor
from kiln.services.memory_relief import MemoryReliever
from kiln.services.states import TRANSITIONS, VmStatus, can_transition
from kiln.services.users import UserService
from kiln.services.vm_recovery import recover
from kiln.services.vms import VmService
from kiln.services.wiring import build_vm_services
from kiln.store.db import Database
from kiln.store.models import Vm


@dataclass
class World:
    service: VmService
    hypervisor: FakeHypervisor
    alice: int
    bob: int

    def new_service(self, settings: Settings, db: Database, images: FakeImageStore) -> VmService:
        """A second server on the same database and the same (surviving) processes."""
        return build_vm_services(settings, db, self.hypervisor, images).vms


@pytest.fixture
async def world(
    settings: Settings, db: Database, hypervisor: FakeHypervisor, images: FakeImageStore
) -> AsyncIterator[World]:
    users = UserService(db)
    alice = await users.create_user("alice")
    bob = await users.create_user("bob")
    service = build_vm_services(settings, db, hypervisor, images).vms
    yield World(service, hypervisor, alice.id, bob.id)
    await service.stop()


def request(**fields: Any) -> VMCreateRequest:
    return VMCreateRequest.model_validate(fields)


def problems_of(error: pytest.ExceptionInfo[InvalidRequest]) -> dict[tuple, str]:
    return {problem.loc: problem.msg for problem in error.value.problems}


async def set_expiry(db: Database, vm_id: str, when: datetime) -> None:
    async with db.transaction() as session:
        await session.execute(update(Vm).where(Vm.id == vm_id).values(expires_at=when))


# -- the state machine -------------------------------------------------------------


def test_every_step_can_fail_and_terminated_is_final() -> None:
    for status in VmStatus:
        if status in (VmStatus.FAILED, VmStatus.TERMINATED):
            continue
        assert can_transition(status, VmStatus.FAILED), status
    assert TRANSITIONS[VmStatus.TERMINATED] == frozenset()
    assert not can_transition("running", VmStatus.CREATING)
    assert can_transition("suspended", VmStatus.RESUMING)


# -- create --------------------------------------------------------------------------


async def test_create_waits_until_running_and_prepares_the_guest(world: World) -> None:
    vm = await world.service.create(world.alice, request(), wait=True)

    assert vm.status == "running"
    assert (vm.memory_mb, vm.vcpu_count, vm.image_variant) == (512, 2, "default")
    assert vm.env_status == "none"
    machine = world.hypervisor.machines[vm.id]
    ops = [op for op, _ in machine.agent.calls]
    assert ops == ["post_restore"]
    post_restore = machine.agent.calls[0][1]
    assert post_restore["hostname"] == vm.id
    assert len(post_restore["seed"]) >= 64 and post_restore["time_ns"] > 0
    assert (vm.expires_at - vm.created_at) == timedelta(seconds=300)


async def test_env_is_applied(world: World) -> None:
    vm = await world.service.create(world.alice, request(env={"TOKEN": "x"}), wait=True)
    assert vm.env_status == "applied"
    assert ("set_env", {"env": {"TOKEN": "x"}}) in world.hypervisor.machines[vm.id].agent.calls


async def test_env_failure_is_reported_not_fatal(world: World) -> None:
    world.hypervisor.agent_failures = {"set_env": agent_error("cannot set")}
    vm = await world.service.create(world.alice, request(env={"A": "1"}), wait=True)
    assert vm.status == "running"
    assert vm.env_status == "failed"
    assert "cannot set" in (vm.env_error or "")


async def test_no_wait_answers_creating_then_runs(world: World) -> None:
    gate = world.hypervisor.ready_gate = asyncio.Event()
    vm = await world.service.create(world.alice, request(env={"A": "1"}), wait=False)
    assert (vm.status, vm.env_status) == ("creating", "pending")

    gate.set()
    for _ in range(100):
        vm = await world.service.get(world.alice, vm.id)
        if vm.status != "creating":
            break
        await asyncio.sleep(0.01)
    assert (vm.status, vm.env_status) == ("running", "applied")


@pytest.mark.parametrize("failure", ["start", "ready", "post_restore"])
async def test_a_failed_boot_leaves_nothing_behind(
    world: World, settings: Settings, failure: str
) -> None:
    if failure == "start":
        world.hypervisor.start_error = boot_error("qemu would not start")
    elif failure == "ready":
        world.hypervisor.ready_error = boot_error("agent never answered")
    else:
        world.hypervisor.agent_failures = {"post_restore": agent_error("no clock")}

    with pytest.raises(VmStartFailed) as error:
        await world.service.create(world.alice, request(), wait=True)

    vm = await world.service.get(world.alice, error.value.vm_id)
    assert vm.status == "failed"
    assert vm.failure_reason == error.value.reason
    assert world.hypervisor.running_ids() == set()
    assert not (settings.vms_dir / vm.id).exists()


async def test_image_not_built(world: World, images: FakeImageStore) -> None:
    with pytest.raises(ImageNotBuilt, match="kiln images build minimal"):
        await world.service.create(world.alice, request(image_variant="minimal"), wait=True)
    assert await world.service.list(world.alice, live_only=False) == []


# -- policy ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "loc"),
    [
        ({"memory_mb": 64}, ("memory_mb",)),
        ({"memory_mb": 10**12}, ("memory_mb",)),
        ({"vcpu_count": 0}, ("vcpu_count",)),
        ({"vcpu_count": 99}, ("vcpu_count",)),
        ({"vm_lifetime_seconds": 0}, ("vm_lifetime_seconds",)),
        ({"env": {"1BAD": "x"}}, ("env", "1BAD")),
        ({"env": {"A-B": "x"}}, ("env", "A-B")),
        ({"env": {"OK": "nul\0"}}, ("env", "OK")),
        ({"image_variant": "nope"}, ("image_variant",)),
        ({"session_id": "has space"}, ("session_id",)),
        ({"egress_policy": {"allow_http": "yes"}}, ("egress_policy", "allow_http")),
        ({"egress_policy": {"surprise": True}}, ("egress_policy", "surprise")),
        ({"snapshot_name": ""}, ("snapshot_name",)),
    ],
)
async def test_policy_violations_are_invalid(
    world: World, fields: dict[str, Any], loc: tuple
) -> None:
    with pytest.raises(InvalidRequest) as error:
        await world.service.create(world.alice, request(**fields), wait=True)
    assert loc in problems_of(error)
    assert world.hypervisor.machines == {}


@pytest.mark.parametrize(
    ("path", "bad"),
    [
        ("relative/path", True),
        ("/", True),
        ("/proc", True),
        ("/sys/kernel", True),
        ("/etc/app", True),
        ("/data/", True),
        ("//dev/../dev/shm", True),
        ("/data", False),
        ("/home/user/work", False),
    ],
)
async def test_mount_paths(world: World, path: str, bad: bool) -> None:
    volumes = [{"volume_id": "vol-1", "mount_path": path}]
    if bad:
        with pytest.raises(InvalidRequest) as error:
            await world.service.create(world.alice, request(volumes=volumes), wait=True)
        assert ("volumes", 0, "mount_path") in problems_of(error)
    else:
        # A good path: then the volume itself is looked for (alice has none).
        with pytest.raises(NotFound, match="volume vol-1 not found"):
            await world.service.create(world.alice, request(volumes=volumes), wait=True)
    assert world.hypervisor.machines == {}


async def test_duplicate_mounts_and_bad_modes(world: World) -> None:
    volumes = [
        {"volume_id": "a", "mount_path": "/data"},
        {"volume_id": "b", "mount_path": "/data", "mode": "rwx"},
    ]
    with pytest.raises(InvalidRequest) as error:
        await world.service.create(world.alice, request(volumes=volumes), wait=True)
    problems = problems_of(error)
    assert "twice" in problems[("volumes", 1, "mount_path")]
    assert ("volumes", 1, "mode") in problems


async def test_all_problems_are_reported_at_once(world: World) -> None:
    with pytest.raises(InvalidRequest) as error:
        await world.service.create(world.alice, request(memory_mb=1, vcpu_count=0), wait=True)
    assert {("memory_mb",), ("vcpu_count",)} <= set(problems_of(error))


@pytest.mark.parametrize(
    "fields",
    [
        {"egress_policy": {}},
        {"egress_policy": {"allow_http": False, "allowed_domains": []}},
        {"volumes": []},
        {"vault_ids": []},
        {"snapshot_on_terminate": False},
    ],
)
async def test_fields_that_ask_for_nothing_are_accepted(
    world: World, fields: dict[str, Any]
) -> None:
    vm = await world.service.create(world.alice, request(**fields), wait=True)
    assert vm.status == "running"


# -- admission ---------------------------------------------------------------------------


async def test_admission_counts_every_owner(world: World, settings: Settings) -> None:
    settings.max_vms = 2
    await world.service.create(world.alice, request(), wait=True)
    await world.service.create(world.bob, request(), wait=True)
    with pytest.raises(CapacityExhausted, match="limit of 2 VMs"):
        await world.service.create(world.alice, request(), wait=True)
    assert len(world.hypervisor.machines) == 2


async def test_admission_memory_and_vcpus(world: World, settings: Settings) -> None:
    settings.max_memory_mb = 1024
    settings.max_vcpus = 3
    await world.service.create(world.alice, request(memory_mb=768, vcpu_count=1), wait=True)
    with pytest.raises(CapacityExhausted, match="memory"):
        await world.service.create(world.alice, request(memory_mb=512, vcpu_count=1), wait=True)
    with pytest.raises(CapacityExhausted, match="vCPUs"):
        await world.service.create(world.alice, request(memory_mb=128, vcpu_count=4), wait=True)


async def test_admission_overcommits_memory_by_the_operators_ratio(world: World, settings: Settings) -> None:
    settings.max_memory_mb = 1024
    settings.memory_overcommit = 2.5
    for _ in range(5):
        await world.service.create(world.alice, request(memory_mb=512, vcpu_count=1), wait=True)
    with pytest.raises(CapacityExhausted, match=r"0 MB free of 2560 \(KILN_MAX_MEMORY_MB times KILN_MEMORY_OVERCOMMIT"):
        await world.service.create(world.alice, request(memory_mb=512, vcpu_count=1), wait=True)


async def test_below_the_memory_floor_nothing_new_starts(world: World, settings: Settings) -> None:
    world.service.admission._floor = MemoryFloor(settings.model_copy(update={"memory_floor_mb": 1024}), lambda: 900)
    with pytest.raises(CapacityExhausted, match=r"900 MB available, below the floor of 1024 MB \(KILN_MEMORY_FLOOR"):
        await world.service.create(world.alice, request(), wait=True)
    assert world.hypervisor.machines == {}


async def test_below_the_reclaim_floor_the_idlest_vm_is_suspended_first(
    world: World, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The order and the passing over (the fake hypervisor cannot save: the
    suspends themselves are recorded here; tests/integration/test_memory_pressure.py
    suspends real VMs under real memory pressure)."""
    available = {"mb": 10_000}
    floors = settings.model_copy(update={"memory_reclaim_floor_mb": 512})
    reliever = MemoryReliever(floors, world.service, lambda: available["mb"])
    stuck, older, newer = [(await world.service.create(world.alice, request(), wait=True)).id for _ in range(3)]
    now = [0.0]
    monkeypatch.setattr(world.service, "activity", Activity(clock=lambda: now[0]))
    for vm_id in (stuck, newer, older):  # the last touched is the least idle
        now[0] += 10
        world.service.activity.touch(vm_id)
    asked = []

    async def suspend(owner_id: int, vm_id: str) -> None:
        asked.append(vm_id)
        if vm_id == stuck:
            raise Conflict(f"vm {vm_id} could not be suspended")
        assert await world.service.set_status(vm_id, VmStatus.RUNNING, VmStatus.SUSPENDING)
        assert await world.service.set_status(vm_id, VmStatus.SUSPENDING, VmStatus.SUSPENDED)

    monkeypatch.setattr(world.service, "suspend", suspend)
    assert await reliever.check() is None and asked == []
    available["mb"] = 300
    assert await reliever.check() == newer
    assert await reliever.check() == older
    assert await reliever.check() is None
    assert asked == [stuck, newer, stuck, older, stuck]


async def test_admission_is_race_free(world: World, settings: Settings) -> None:
    settings.max_vms = 3
    results = await asyncio.gather(
        *(world.service.create(world.alice, request(), wait=False) for _ in range(8)),
        return_exceptions=True,
    )
    admitted = [result for result in results if isinstance(result, Vm)]
    refused = [result for result in results if isinstance(result, CapacityExhausted)]
    assert (len(admitted), len(refused)) == (3, 5)


async def test_ended_vms_free_their_capacity(world: World, settings: Settings) -> None:
    settings.max_vms = 1
    vm = await world.service.create(world.alice, request(), wait=True)
    await world.service.terminate(world.alice, vm.id)
    assert (await world.service.create(world.alice, request(), wait=True)).status == "running"


# -- sessions ------------------------------------------------------------------------------


async def test_sessions(world: World) -> None:
    generated = await world.service.create(world.alice, request(), wait=True)
    assert generated.session_id

    named = await world.service.create(world.alice, request(session_id="work-1"), wait=True)
    assert named.session_id == "work-1"
    assert (await world.service.session_vm(world.alice, "work-1")).id == named.id
    with pytest.raises(Conflict, match="already has a live VM"):
        await world.service.create(world.alice, request(session_id="work-1"), wait=True)

    # Session ids are per owner: bob's "work-1" is another session.
    with pytest.raises(NotFound):
        await world.service.session_vm(world.bob, "work-1")
    assert (await world.service.create(world.bob, request(session_id="work-1"), wait=True)).id

    # Once its VM is gone, a session can have a new one.
    await world.service.terminate(world.alice, named.id)
    again = await world.service.create(world.alice, request(session_id="work-1"), wait=True)
    assert (await world.service.session_vm(world.alice, "work-1")).id == again.id


# -- terminate, update, console ------------------------------------------------------------------


async def test_terminate_is_idempotent(world: World, settings: Settings) -> None:
    vm = await world.service.create(world.alice, request(), wait=True)
    first = await world.service.terminate(world.alice, vm.id)
    second = await world.service.terminate(world.alice, vm.id)
    assert first.status == second.status == "terminated"
    assert second.terminated_at is not None
    assert world.hypervisor.running_ids() == set()
    assert not (settings.vms_dir / vm.id).exists()
    assert await world.service.list(world.alice, live_only=True) == []
    assert [v.id for v in await world.service.list(world.alice, live_only=False)] == [vm.id]


async def test_terminate_while_creating_stops_the_boot(world: World) -> None:
    world.hypervisor.ready_gate = asyncio.Event()  # never set: the guest never answers
    vm = await world.service.create(world.alice, request(), wait=False)
    await asyncio.sleep(0.05)
    ended = await world.service.terminate(world.alice, vm.id)
    assert ended.status == "terminated"
    assert world.hypervisor.running_ids() == set()


async def test_terminating_a_failed_vm_keeps_its_reason(world: World) -> None:
    world.hypervisor.start_error = boot_error("broken")
    with pytest.raises(VmStartFailed) as error:
        await world.service.create(world.alice, request(), wait=True)
    ended = await world.service.terminate(world.alice, error.value.vm_id)
    assert ended.status == "terminated"
    assert ended.failure_reason and "broken" in ended.failure_reason


async def test_update(world: World) -> None:
    vm = await world.service.create(world.alice, request(metadata={"a": 1}), wait=True)
    before = datetime.now(UTC)
    updated = await world.service.update(
        world.alice,
        vm.id,
        VMUpdateRequest(vm_lifetime_seconds=3600, metadata={"b": 2}, snapshot_name="keep"),
    )
    assert updated.expires_at >= before + timedelta(seconds=3600)
    assert updated.labels == {"b": 2}
    assert updated.snapshot_name == "keep"
    assert (await world.service.get(world.alice, vm.id)).labels == {"b": 2}

    suspending = await world.service.update(world.alice, vm.id, VMUpdateRequest(auto_suspend=True, auto_resume=True))
    assert (suspending.auto_suspend, suspending.auto_resume) == (True, True)
    with pytest.raises(InvalidRequest):
        await world.service.update(world.alice, vm.id, VMUpdateRequest(vm_lifetime_seconds=-5))

    await world.service.terminate(world.alice, vm.id)
    with pytest.raises(Conflict):
        await world.service.update(world.alice, vm.id, VMUpdateRequest(metadata={}))


async def test_console_tail(world: World, settings: Settings) -> None:
    vm = await world.service.create(world.alice, request(), wait=True)
    (settings.vms_dir / vm.id / "console.log").write_text("x" * 100 + "last words")
    assert await world.service.console_tail(world.alice, vm.id, 10) == "last words"
    await world.service.terminate(world.alice, vm.id)
    assert await world.service.console_tail(world.alice, vm.id, 10) == ""


async def test_metadata_filter(world: World) -> None:
    web = await world.service.create(world.alice, request(metadata={"role": "web", "n": 1}), True)
    await world.service.create(world.alice, request(metadata={"role": "db"}), True)
    found = await world.service.list(world.alice, True, {"role": "web"})
    assert [vm.id for vm in found] == [web.id]
    assert await world.service.list(world.alice, True, {"role": "web", "n": 2}) == []


# -- tenancy ---------------------------------------------------------------------------------------


async def test_another_owners_vm_does_not_exist(world: World) -> None:
    vm = await world.service.create(world.alice, request(), wait=True)
    for attempt in (
        world.service.get(world.bob, vm.id),
        world.service.terminate(world.bob, vm.id),
        world.service.update(world.bob, vm.id, VMUpdateRequest(metadata={})),
        world.service.console_tail(world.bob, vm.id, 100),
        world.service.running_machine(world.bob, vm.id),
    ):
        with pytest.raises(NotFound):
            await attempt
    assert await world.service.list(world.bob, live_only=False) == []
    assert (await world.service.get(world.alice, vm.id)).status == "running"
    assert await world.service.running_machine(world.alice, vm.id) is not None


# -- background work -------------------------------------------------------------------------------


async def test_reaper_terminates_expired_vms(world: World, db: Database) -> None:
    expired = await world.service.create(world.alice, request(), wait=True)
    kept = await world.service.create(world.alice, request(), wait=True)
    await set_expiry(db, expired.id, datetime.now(UTC) - timedelta(seconds=1))

    await world.service.reap_expired()

    assert (await world.service.get(world.alice, expired.id)).status == "terminated"
    assert (await world.service.get(world.alice, kept.id)).status == "running"
    assert world.hypervisor.running_ids() == {kept.id}


async def test_reaper_loop_runs_in_the_background(world: World, db: Database) -> None:
    world.service.start_loops()
    vm = await world.service.create(world.alice, request(), wait=True)
    await set_expiry(db, vm.id, datetime.now(UTC))
    for _ in range(40):
        if (await world.service.get(world.alice, vm.id)).status == "terminated":
            break
        await asyncio.sleep(0.1)
    assert (await world.service.get(world.alice, vm.id)).status == "terminated"


async def test_watchdog_fails_vms_whose_process_died(world: World, settings: Settings) -> None:
    vm = await world.service.create(world.alice, request(), wait=True)
    (settings.vms_dir / vm.id / "console.log").write_text("Kernel panic - not syncing")
    world.hypervisor.machines[vm.id].alive = False

    await world.service.check_machines()

    failed = await world.service.get(world.alice, vm.id)
    assert failed.status == "failed"
    assert failed.failure_reason.startswith("qemu process exited")
    assert "Kernel panic" in failed.failure_reason
    assert not (settings.vms_dir / vm.id).exists()


async def test_restart_adopts_running_vms_and_fails_the_rest(
    world: World, settings: Settings, db: Database, images: FakeImageStore
) -> None:
    survivor = await world.service.create(world.alice, request(), wait=True)
    casualty = await world.service.create(world.alice, request(), wait=True)
    await world.service.stop()
    # Shutdown leaves VMs running (only this server's connections close).
    assert world.hypervisor.running_ids() == {survivor.id, casualty.id}
    assert world.hypervisor.machines[survivor.id].connections_closed
    world.hypervisor.machines[casualty.id].alive = False

    restarted = world.new_service(settings, db, images)
    await recover(restarted, db)

    assert await restarted.running_machine(world.alice, survivor.id) is not None
    failed = await restarted.get(world.alice, casualty.id)
    assert (failed.status, failed.failure_reason) == ("failed", "not running after server restart")
    await restarted.stop()


async def test_restart_fails_vms_caught_creating(
    world: World, settings: Settings, db: Database, images: FakeImageStore
) -> None:
    world.hypervisor.ready_gate = asyncio.Event()
    vm = await world.service.create(world.alice, request(), wait=False)
    await asyncio.sleep(0.05)
    # A crash, not a clean stop: the row stays "creating" and the process lingers.
    world.service._boot_tasks[vm.id].cancel()
    await asyncio.sleep(0.01)

    restarted = world.new_service(settings, db, images)
    await recover(restarted, db)

    failed = await restarted.get(world.alice, vm.id)
    assert failed.status == "failed"
    assert "restarted while the VM was being created" in (failed.failure_reason or "")
    assert world.hypervisor.running_ids() == set()

