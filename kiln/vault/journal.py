"""The egress proxy's record of every call it injected a credential into.

The egress daemon appends one JSON line per call to
``$KILN_DATA_DIR/net/vault-calls/calls.jsonl`` (0600; opened, written in one
``write`` and closed per call, so a line is never half there). The API takes
them into the store (``request-logs``): it asks the daemon to ``rotate``
(rename the file to ``taken-<time>-<id>.jsonl``: the daemon is its only writer,
so nothing is lost between a read and a rename), reads every taken file,
inserts the calls (by id: a file read twice after a crash adds nothing twice)
and deletes the file.

A call holds no value and no header: the host, method, path (no query string:
it may carry the guest's own secrets), status, and which credential went in.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

JOURNAL_DIR = "vault-calls"
CURRENT = "calls.jsonl"
TAKEN_PREFIX = "taken-"
# Past this the daemon drops calls (logging that it does) until the API takes them.
MAX_JOURNAL_BYTES = 64 * 1024 * 1024
MAX_PATH_LENGTH = 2048


@dataclass(frozen=True)
class Call:
    id: str
    at: float  # seconds since the epoch
    vm_id: str
    vault_id: str
    service_id: str
    credential_id: str
    credential_name: str
    host: str
    method: str
    path: str
    status: int | None  # None: no answer from the service (the error says why)
    error: str | None = None

    @classmethod
    def new(cls, **fields: object) -> Call:
        return cls(id=uuid.uuid4().hex, at=time.time(), **fields)  # type: ignore[arg-type]

    @classmethod
    def from_json(cls, data: dict) -> Call:
        status, error = data.get("status"), data.get("error")
        return cls(
            id=str(data["id"]), at=float(data["at"]), vm_id=str(data["vm_id"]), vault_id=str(data["vault_id"]),
            service_id=str(data["service_id"]), credential_id=str(data["credential_id"]),
            credential_name=str(data["credential_name"]), host=str(data["host"]), method=str(data["method"]),
            path=str(data["path"]), status=int(status) if status is not None else None,
            error=str(error) if error is not None else None,
        )  # fmt: skip


def request_path(target: str) -> str:
    """What of a request target is recorded: the path, without its query."""
    return target.split("?", 1)[0][:MAX_PATH_LENGTH]


class CallJournal:
    def __init__(self, state_dir: Path) -> None:
        self.directory = state_dir / JOURNAL_DIR
        self.current = self.directory / CURRENT
        self._dropping = False

    def ensure(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.directory.chmod(0o700)

    def append(self, call: Call) -> None:
        """The daemon's: one line per call."""
        line = (json.dumps(asdict(call), separators=(",", ":")) + "\n").encode()
        try:
            if self.current.stat().st_size + len(line) > MAX_JOURNAL_BYTES:
                if not self._dropping:
                    log.error("vault call journal is full (%d bytes): calls are not recorded", MAX_JOURNAL_BYTES)
                self._dropping = True
                return
        except FileNotFoundError:
            pass
        self._dropping = False
        self.ensure()
        fd = os.open(self.current, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def rotate(self) -> None:
        """The daemon's: hand the current file over to whoever takes it."""
        with contextlib.suppress(FileNotFoundError):
            os.rename(self.current, self.directory / f"{TAKEN_PREFIX}{time.time_ns()}-{uuid.uuid4().hex[:8]}.jsonl")

    def taken(self) -> list[Path]:
        try:
            return sorted(self.directory.glob(f"{TAKEN_PREFIX}*.jsonl"))
        except FileNotFoundError:
            return []

    @staticmethod
    def read(path: Path) -> list[Call]:
        calls = []
        for line in path.read_text(errors="replace").splitlines():
            try:
                calls.append(Call.from_json(json.loads(line)))
            except (ValueError, TypeError, KeyError):
                continue  # a damaged line loses one record, not the file
        return calls
