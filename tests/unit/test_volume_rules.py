"""The rules of mounting volumes (``kiln.services.volumes.rules``): what a
mount request may say, and which mounts of one volume exclude each other."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from kiln.services.volumes.rules import as_mount, conflict, mount_problems


@dataclass
class Row:
    vm_id: str
    volume_id: str
    mount_path: str
    mode: str
    checkpoint_id: str | None = None


WRITER = Row("vm-w", "vol-1", "/data", "rw")
READER = Row("vm-r", "vol-1", "/data", "ro")
ON_CHECKPOINT = Row("vm-c", "vol-1", "/old", "rw", "cp-1")


@pytest.mark.parametrize(
    ("mode", "checkpoint_id", "others", "refused_because"),
    [
        ("rw", None, [], None),
        ("rw", None, [WRITER], "mounted rw in vm-w"),
        ("rw", None, [READER], "mounted ro in vm-r"),
        ("ro", None, [WRITER], "mounted rw in vm-w"),
        ("ro", None, [READER, READER], None),
        # A checkpoint never changes: its mounts exclude nothing, and nothing excludes them.
        ("rw", None, [ON_CHECKPOINT], None),
        ("rw", "cp-1", [WRITER], None),
        ("ro", "cp-1", [WRITER, READER], None),
    ],
)
def test_rw_is_exclusive_ro_is_shared_checkpoints_are_free(
    mode: str, checkpoint_id: str | None, others: list[Row], refused_because: str | None
) -> None:
    reason = conflict(as_mount("vol-1", "/mnt", mode, checkpoint_id), others)
    if refused_because is None:
        assert reason is None
    else:
        assert reason is not None and refused_because in reason


@pytest.mark.parametrize(
    ("path", "mode", "bad_fields"),
    [
        ("/data", "rw", set()),
        ("/home/me/work", "ro", set()),
        ("/data", "rwx", {"mode"}),
        ("data", "rw", {"mount_path"}),
        ("/", "rw", {"mount_path"}),
        ("/etc/app", "rw", {"mount_path"}),
        ("/proc/x", "ro", {"mount_path"}),
        ("/data/../etc", "rw", {"mount_path"}),
        ("/data/", "rw", {"mount_path"}),
        ("/da\0ta", "nope", {"mount_path", "mode"}),
    ],
)
def test_mount_requests(path: str, mode: str, bad_fields: set[str]) -> None:
    problems = mount_problems(("volumes", 0), path, mode)
    assert {problem.loc[-1] for problem in problems} == bad_fields
    assert all(problem.loc[:2] == ("volumes", 0) for problem in problems)
