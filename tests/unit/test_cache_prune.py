"""The server's automatic cache pass (``CachePrune``), without QEMU: it removes
what the command would, skips a round while an image build holds the cache,
and forgets the rows of base snapshots whose directory is gone."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime

from unit.test_prune import build

from kiln.config import Settings
from kiln.runtime.prune import builds_held
from kiln.services.cache_prune import CachePrune
from kiln.store.db import Database
from kiln.store.models import Snapshot
from kiln.store.repositories import SnapshotRepository


def base_row(snapshot_id: str, directory: str) -> Snapshot:
    return Snapshot(
        id=snapshot_id, owner_id=None, name="default", type="base", status="ready", vcpu_count=1,
        memory_mb=256, image_variant="default", size_bytes=0, directory=directory, created_at=datetime.now(UTC),
    )  # fmt: skip


async def test_a_pass_removes_unneeded_builds_and_the_rows_of_gone_bases(settings: Settings, db: Database) -> None:
    current, unused = build(settings, "default-current"), build(settings, "default-unused")
    os.symlink(current.name, settings.images_dir / "default.current")
    kept_base = settings.cache_dir / "base-snapshots" / "default-1111111111111111-256m-1c-tcg-f3"
    kept_base.mkdir(parents=True)
    # A user snapshot's state names the base snapshot it stands on: that keeps it.
    snapshot = settings.data_dir / "snapshots" / "snap-1"
    snapshot.mkdir(parents=True)
    (snapshot / "state.json").write_text(json.dumps({"memory_backing": {"path": str(kept_base / "memory.ram")}}))
    async with db.transaction() as session:
        await SnapshotRepository(session).add(base_row("base-gone", str(settings.cache_dir / "base-snapshots" / "x")))
        await SnapshotRepository(session).add(base_row("base-kept", str(kept_base)))
    passes = CachePrune(settings, db)

    # While a build holds the cache the pass waits for the next round.
    with builds_held(settings, wait=True):
        assert await passes.prune() == []
    assert unused.is_dir()

    assert unused in await passes.prune()
    assert current.is_dir() and not unused.exists()
    async with db.transaction() as session:
        left = [row.id for row in await SnapshotRepository(session).list_any_owner(["base"])]
    assert left == ["base-kept"] and kept_base.is_dir()
