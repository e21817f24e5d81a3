"""The store against SQLite and PostgreSQL (the latter when KILN_TEST_POSTGRES_URL is set)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection, inspect
from unit.fakes import FakeHypervisor, FakeImageStore

from kiln.config import Settings
from kiln.schemas.vms import VMCreateRequest
from kiln.services.users import UserService
from kiln.services.wiring import build_vm_services
from kiln.store.db import Database, alembic_config
from kiln.store.models import Base, Vm
from kiln.store.repositories import SessionRepository, UserRepository, VmRepository


async def add_vm(db: Database, owner_id: int, vm_id: str, status: str = "running") -> None:
    now = datetime.now(UTC)
    async with db.transaction() as session:
        await SessionRepository(session).get_or_add(owner_id, f"s-{vm_id}")
        await VmRepository(session).add(
            Vm(
                id=vm_id, owner_id=owner_id, session_id=f"s-{vm_id}", status=status,
                vcpu_count=2, memory_mb=256, image_variant="default", labels={"n": vm_id},
                env_status="none", vault_ids=[], snapshot_on_terminate=False,
                auto_suspend=False, auto_resume=False, expires_at=now + timedelta(minutes=5),
            )
        )  # fmt: skip


async def test_migrations_match_the_models_and_are_idempotent(store: Database) -> None:
    await store.migrate()  # a second run is a no-op

    def differences(connection: Connection) -> list:
        return compare_metadata(MigrationContext.configure(connection), Base.metadata)

    async with store.engine.connect() as connection:
        assert await connection.run_sync(differences) == []


async def test_downgrade_to_nothing_and_back(store: Database) -> None:
    def downgrade(connection: Connection) -> set[str]:
        command.downgrade(alembic_config(connection), "base")
        return set(inspect(connection).get_table_names())

    async with store.engine.begin() as connection:
        assert await connection.run_sync(downgrade) == {"alembic_version"}
    await store.migrate()


async def test_rows_are_per_owner_and_timestamps_utc(store: Database) -> None:
    async with store.transaction() as session:
        alice = await UserRepository(session).add("alice", None)
        bob = await UserRepository(session).add("bob", None)
    await add_vm(store, alice.id, "vm-a")
    await add_vm(store, bob.id, "vm-b", status="terminated")

    async with store.transaction() as session:
        vms = VmRepository(session)
        assert [vm.id for vm in await vms.list(alice.id)] == ["vm-a"]
        assert await vms.get(bob.id, "vm-a") is None
        vm = await vms.get(alice.id, "vm-a")
        assert vm is not None and vm.labels == {"n": "vm-a"}
        assert vm.created_at.tzinfo is not None and vm.created_at.utcoffset() == timedelta(0)
        usage = await vms.usage_any_owner(["running"])
        assert (usage.vms, usage.memory_mb, usage.vcpus) == (1, 256, 2)


async def test_compare_and_set_lets_one_transition_win(store: Database) -> None:
    async with store.transaction() as session:
        owner = await UserRepository(session).add("carol", None)
    await add_vm(store, owner.id, "vm-c")
    async with store.transaction() as session:
        vms = VmRepository(session)
        assert await vms.compare_and_set_status("vm-c", "running", "terminating")
        assert not await vms.compare_and_set_status("vm-c", "running", "failed")
        assert (await vms.get(owner.id, "vm-c")).status == "terminating"


async def test_the_services_work_on_this_database(database_url: str, tmp_path) -> None:
    # Fakes for the runtime, so nothing of the host either: no networking (it made
    # the host's default nftables table), no confinement, no memory floor.
    settings = Settings(
        data_dir=tmp_path / "var",
        database_url=database_url,
        max_vms=4,
        networking="off",
        confinement="off",
        memory_floor_mb=0,
        memory_reclaim_floor_mb=0,
    )
    db = Database(settings.database)
    await db.migrate()
    service = build_vm_services(settings, db, FakeHypervisor(), FakeImageStore(tmp_path)).vms
    try:
        user = await UserService(db).create_user("dana")
        vm = await service.create(
            user.id, VMCreateRequest(metadata={"nested": {"a": [1, 2]}}), wait=True
        )
        assert (await service.list(user.id, True, {"nested": {"a": [1, 2]}}))[0].id == vm.id
        assert (await service.terminate(user.id, vm.id)).status == "terminated"
    finally:
        await service.stop()
        await db.close()


async def test_passwords_and_revoking_keys_of_any_user(store: Database) -> None:
    from kiln.services.auth import AuthService
    from kiln.services.errors import NotFound, Unauthenticated

    users = UserService(store)
    owner = await users.create_user("lou")
    created = await users.create_api_key(owner.id, "laptop")
    await users.set_password("lou", "new password")
    auth = AuthService(store, b"s" * 32, 60)
    assert await auth.login("lou", "new password")
    revoked = await users.revoke_api_key(created.record.id)
    assert revoked.name == "laptop" and revoked.owner_id == owner.id
    with pytest.raises(Unauthenticated):
        await auth.authenticate(created.key)
    with pytest.raises(NotFound):
        await users.revoke_api_key(created.record.id)
    with pytest.raises(NotFound):
        await users.set_password("nobody", "pw")
