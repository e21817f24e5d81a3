"""The console log's cap keeps the newest bytes, in the same file."""

from __future__ import annotations

import os
from pathlib import Path

from kiln.runtime.qemu import console


def test_a_log_over_its_cap_keeps_its_tail_in_the_same_file(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    lines = b"".join(b"line %07d\n" % n for n in range(600_000))  # 7.8 MB
    log.write_bytes(lines)
    inode = log.stat().st_ino
    assert console.cap(log, cap_bytes=4 * 2**20, keep_bytes=2 * 2**20)
    kept = log.read_bytes()
    assert log.stat().st_ino == inode
    assert 2 * 2**20 - 8192 <= len(kept) <= 2 * 2**20 + os.statvfs(tmp_path).f_bsize
    assert lines.endswith(kept)


def test_a_log_under_its_cap_is_left_alone(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_bytes(b"short\n")
    assert not console.cap(log, cap_bytes=1024)
    assert log.read_bytes() == b"short\n"
    assert not console.cap(tmp_path / "missing.log")
