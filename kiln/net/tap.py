"""TAP devices through ``/dev/net/tun`` (ioctls from linux/if_tun.h).

A TAP belongs to the namespace of the process that opened ``/dev/net/tun``, so
these run inside the VM's namespace (``kiln.net.netns.run_in``). The flags are
what QEMU expects of a ``-netdev tap,fd=N``: ``IFF_TAP | IFF_NO_PI``, and no
``IFF_VNET_HDR``: QEMU probes the fd for it, and with it the guest negotiates
checksum and segmentation offloads that a VM's saved state then requires of
its next NIC ("saved image requires vnet_hdr=on"), so a snapshot of a wired VM
could not be restored unwired (on a host without networking, or by hand, as
the bench's raw baselines do). Base snapshots are unwired; every NIC now
offers the same features, wired or not.
"""

from __future__ import annotations

import fcntl
import os
import struct

TUN_DEVICE = "/dev/net/tun"
TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
TUNSETOWNER = 0x400454CC
TUNSETGROUP = 0x400454CE
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
QEMU_TAP_FLAGS = IFF_TAP | IFF_NO_PI
IFREQ_SIZE = 40


def _ifreq(name: str, flags: int) -> bytes:
    return struct.pack("16sH", name.encode(), flags).ljust(IFREQ_SIZE, b"\0")


def create_persistent(name: str, uid: int, gid: int) -> None:
    """Make the persistent TAP ``name`` owned by ``uid``/``gid`` in the calling
    thread's namespace (it outlives every fd, until its namespace goes)."""
    fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, _ifreq(name, QEMU_TAP_FLAGS))
        fcntl.ioctl(fd, TUNSETOWNER, uid)
        fcntl.ioctl(fd, TUNSETGROUP, gid)
        fcntl.ioctl(fd, TUNSETPERSIST, 1)
    finally:
        os.close(fd)


def open_queue(name: str) -> int:
    """An fd attached to the existing TAP ``name`` (for QEMU; close-on-exec, so
    only a process it is passed to explicitly gets it)."""
    fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, _ifreq(name, QEMU_TAP_FLAGS))
    except BaseException:
        os.close(fd)
        raise
    return fd
