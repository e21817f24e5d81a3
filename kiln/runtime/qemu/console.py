"""The guest's serial console log, capped: a guest that writes to its console
without end costs the host at most ``CAP_BYTES`` per VM (plus what it writes
between two checks).

QEMU appends to ``console.log`` (``append=on``). When the file passes the cap,
Kiln drops its head in place with ``fallocate(FALLOC_FL_COLLAPSE_RANGE)``: the
same file, the tail kept, atomic against QEMU's appends. Where the file system
cannot collapse a range, the tail is copied to the front and the file cut
(a few bytes QEMU writes meanwhile may be lost; the log is a diagnostic).
"""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

CAP_BYTES = 4 * 1024 * 1024
# What is kept when the cap is passed: the newest half.
KEEP_BYTES = CAP_BYTES // 2
FALLOC_FL_COLLAPSE_RANGE = 0x08

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]


def cap(path: Path, cap_bytes: int = CAP_BYTES, keep_bytes: int = KEEP_BYTES) -> bool:
    """Keep the console log under ``cap_bytes``; True if it was cut."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        size = os.fstat(fd).st_size
        if size <= cap_bytes:
            return False
        block = os.fstatvfs(fd).f_bsize
        # Collapsed ranges must be whole blocks.
        drop = (size - keep_bytes) // block * block
        if drop > 0 and _libc.fallocate(fd, FALLOC_FL_COLLAPSE_RANGE, 0, drop) == 0:
            return True
        if ctypes.get_errno() not in (errno.EOPNOTSUPP, errno.EINVAL, 0):
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), str(path))
        tail = os.pread(fd, keep_bytes, size - keep_bytes)
        os.pwrite(fd, tail, 0)
        os.ftruncate(fd, len(tail))
        return True
    finally:
        os.close(fd)
