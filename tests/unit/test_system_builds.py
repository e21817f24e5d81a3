"""POST /v1/snapshots with type=system, what is refused before anything is made
(fake VMs; the builds themselves: tests/e2e/test_system_snapshots.py)."""

from __future__ import annotations

from unit.harness import add_user, key_headers

from kiln.config import Settings
from kiln.services.snapshots.system import OPERATOR_ONLY
from kiln.store.db import Database
from kiln.store.repositories import SnapshotRepository


async def all_snapshot_rows(settings: Settings) -> list[str]:
    db = Database(settings.database)
    try:
        async with db.transaction() as session:
            return [f"{s.type}:{s.id}" for s in await SnapshotRepository(session).list_any_owner() if s.type != "base"]
    finally:
        await db.close()


async def test_only_the_operator_makes_system_snapshots_and_a_bad_body_makes_nothing(  # type: ignore[no-untyped-def]
    run_app, admin_key, settings: Settings
) -> None:
    build = {"oci_image": "default", "type": "system", "build_args": {"post_build_cmd": "true"}}
    async with run_app() as client:
        admin = key_headers(admin_key())
        user = key_headers(await add_user(settings, "alice"))
        refused = await client.post("/v1/snapshots", json=build, headers=user)
        assert refused.status_code == 403 and refused.json()["detail"] == OPERATOR_ONLY
        refused = await client.post("/v1/system-snapshots", json={"image_variant": "default"}, headers=user)
        assert refused.status_code == 403 and refused.json()["detail"] == OPERATOR_ONLY

        bad = {**build, "build_args": {"colour": "blue"}}
        answer = await client.post("/v1/snapshots", json=bad, headers=admin)
        assert answer.status_code == 422 and ["body", "build_args", "colour"] in [
            problem["loc"] for problem in answer.json()["detail"]
        ], answer.text
        answer = await client.post("/v1/snapshots", json={**build, "type": "odd"}, headers=admin)
        assert answer.status_code == 422 and "system" in answer.text
        for key in (admin, user):
            assert (await client.get("/v1/snapshots?type=system", headers=key)).json() == []
    assert await all_snapshot_rows(settings) == []
