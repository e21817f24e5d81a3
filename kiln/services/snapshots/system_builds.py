"""System snapshots built or imported through ``POST /v1/snapshots`` with
``type: system`` (the SDK's ``snapshots.create(snapshot_type="system")`` and
``templates.publish``, ``instavm snapshot build --type system``).

The operator's only (403, ``OPERATOR_ONLY``, before anything is made). The
body is checked and the build (``builds.ImageBuilder``) or import
(``oci_import.ImageImporter``) started exactly as for a user snapshot, into a
``staging`` row of the admin's (``requests.check_basics`` makes ``system`` a
staging row: never listed, never anyone's snapshot); the system snapshot's row
is made ``creating`` beside it (``SystemSnapshots.reserve``) and is what the
answer and the SDK's polling see. When the staged work ends, a ready staging
row is copied into the system snapshot (``SystemSnapshots.fill``, as
``POST /v1/system-snapshots`` copies one of the admin's snapshots) and its
``build_log`` comes along; a failed one fails the system snapshot with its
reason. The staging row goes either way, and a stopped server's leftovers go
at the next start (the system snapshot itself is failed then, with every
unfinished snapshot, by ``SnapshotService.fail_unfinished``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from kiln.schemas.snapshots import SnapshotImportRequest
from kiln.services.background import BackgroundTasks
from kiln.services.errors import Forbidden
from kiln.services.events.audit import is_admin
from kiln.services.snapshots.builds import ImageBuilder
from kiln.services.snapshots.oci_import import ImageImporter
from kiln.services.snapshots.rows import record, reload
from kiln.services.snapshots.service import SnapshotService
from kiln.services.snapshots.system import OPERATOR_ONLY, SystemSnapshots
from kiln.services.states import SnapshotStatus, SnapshotType
from kiln.store.db import Database
from kiln.store.models import Snapshot, User
from kiln.store.repositories import SnapshotRepository

log = logging.getLogger(__name__)


class SystemBuilds:
    def __init__(
        self,
        db: Database,
        system: SystemSnapshots,
        builder: ImageBuilder,
        importer: ImageImporter,
        snapshots: SnapshotService,
        background: BackgroundTasks,
    ) -> None:
        self._db = db
        self._system = system
        self._builder = builder
        self._importer = importer
        self._snapshots = snapshots
        self._background = background

    async def create(self, user: User, request: SnapshotImportRequest, wait: bool) -> Snapshot:
        """The system snapshot's record, ``creating`` (with ``wait``: once it
        ended ``ready`` or ``failed``)."""
        if not is_admin(user):
            raise Forbidden(OPERATOR_ONLY)
        await self._system.check_name(request.name)
        starter = self._builder if self._builder.builds_on(request.oci_image) else self._importer
        staged, work = await starter.start(user.id, request)
        try:
            snapshot = await self._system.reserve(user, request.name, staged, published_from=request.oci_image)
        except BaseException:
            # A publish of the same name won the race: the staged work is not wanted.
            work.cancel()
            self._background.run(self._publish(work, staged.id, None), f"discard {staged.id}")
            raise
        task = self._background.run(self._publish(work, staged.id, snapshot.id), f"publish {snapshot.id}")
        if wait:
            with contextlib.suppress(Exception):
                await asyncio.shield(task)
        return await reload(self._db, snapshot.id)

    async def remove_unfinished(self) -> None:
        """Staging rows a stopped server left (their system snapshots were failed
        by ``SnapshotService.fail_unfinished``, their builders terminated)."""
        async with self._db.transaction() as session:
            leftovers = await SnapshotRepository(session).list_any_owner([SnapshotType.STAGING])
        for staged in leftovers:
            log.info("removing %s, the staging row of an unfinished system snapshot", staged.id)
            await self._discard(staged)

    async def _publish(self, work: asyncio.Task[None], staged_id: str, system_id: str | None) -> None:
        """Once ``work`` ended: the system snapshot (if any) filled from the
        staging row or failed with its reason; the staging row removed first,
        so a caller that sees the system snapshot end finds nothing staged."""
        discarded = False

        async def discard() -> None:
            nonlocal discarded
            if not discarded:
                discarded = True
                # Shielded: a server stopping mid-copy still removes what it staged.
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._discard(await reload(self._db, staged_id)))

        try:
            with contextlib.suppress(Exception):
                await work  # its outcome is on the staging row
            staged = await reload(self._db, staged_id)
            if system_id is not None and staged.status == SnapshotStatus.READY:
                await self._system.fill(system_id, staged, before_done=discard, build_log=staged.build_log)
            elif system_id is not None:
                await discard()
                reason = staged.failure_reason or "the build or import did not finish"
                await record(
                    self._db, system_id, None, status=SnapshotStatus.FAILED, failure_reason=reason,
                    build_log=staged.build_log,
                )  # fmt: skip
        finally:
            await discard()

    async def _discard(self, staged: Snapshot) -> None:
        if staged.status == SnapshotStatus.CREATING:
            # Its work ended (or the server is starting): nothing writes into it any more.
            await record(self._db, staged.id, None, status=SnapshotStatus.FAILED, failure_reason="discarded")
            staged = await reload(self._db, staged.id)
        try:
            await self._snapshots.remove(staged, staged.owner_id or 0)
        except Exception as error:
            log.warning("staging row %s of a system snapshot was left: %s", staged.id, error)
