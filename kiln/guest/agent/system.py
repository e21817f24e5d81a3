"""The guest as a machine: identity after a restore (post_restore: entropy,
clock, hostname), the clock alone (set_clock), power (shutdown); and the guard
that keeps a developer host's own system out of reach of the system ops."""

from __future__ import annotations

import fcntl
import os
import random
import socket
import struct
import subprocess
import time
from typing import Any

from .args import arg, b64_arg
from .config import AgentConfig
from .errors import AgentError
from .files import write_atomically
from .python_session import PythonSessions
from .wire import Emit, Handler, log

RNDADDENTROPY = 0x40085203  # _IOW('R', 0x03, int[2])
RNDRESEEDCRNG = 0x5207  # _IO('R', 0x07): reseed the kernel generator now
LINUX_REBOOT_CMD_POWER_OFF = 0x4321FEDC


class System:
    def __init__(self, config: AgentConfig, sessions: PythonSessions) -> None:
        self.config = config
        self.sessions = sessions

    def handlers(self) -> dict[str, Handler]:
        return {
            "post_restore": self.op_post_restore,
            "set_clock": self.op_set_clock,
            "shutdown": self.op_shutdown,
        }

    def op_post_restore(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        """{"seed" (b64, >= 32 bytes), "time_ns", "hostname"} -> {}

        After a snapshot restore: fresh kernel entropy, the host's time, a new
        identity, and reseeded random state here and in every python session."""
        seed = b64_arg(args, "seed")
        if len(seed) < 32:
            raise AgentError("EINVAL", "seed must be at least 32 bytes")
        time_ns = arg(args, "time_ns", int)
        hostname = arg(args, "hostname", str)
        if not hostname or len(hostname) > 64 or "/" in hostname or "\0" in hostname:
            raise AgentError("EINVAL", f"bad hostname {hostname!r}")
        credit_entropy(seed)
        if self.config.system:
            time.clock_settime_ns(time.CLOCK_REALTIME, time_ns)
            socket.sethostname(hostname)
        write_atomically(os.path.join(self.config.etc_dir, "hostname"), hostname + "\n")
        random.seed()
        self.sessions.reseed_idle()
        return {}

    def op_set_clock(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        """{"time_ns"} -> {"previous_ns": the clock just before}: the host's time.

        A warm pool VM got its identity (``post_restore``) when the pool filled;
        when it is claimed, possibly much later, only its clock is set again."""
        time_ns = arg(args, "time_ns", int)
        previous = time.time_ns()
        if self.config.system:
            time.clock_settime_ns(time.CLOCK_REALTIME, time_ns)
        return {"previous_ns": previous}

    def op_shutdown(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        """{} -> {}, then the VM powers off (on a developer host: the agent exits)."""
        return {}

    def power_off(self) -> None:
        """Called once the reply to ``shutdown`` is sent."""
        os.sync()
        if not self.config.system:
            log("shutdown requested; exiting (not powering off a developer host)")
            os._exit(0)
        import ctypes  # here, not at the top: it is slow to import under TCG

        libc = ctypes.CDLL(None, use_errno=True)
        libc.reboot(LINUX_REBOOT_CMD_POWER_OFF)
        log(f"reboot(POWER_OFF) failed: {os.strerror(ctypes.get_errno())}")
        subprocess.run(["poweroff", "-f"], check=False)

    def require_own(self, namespace: str, op: str) -> None:
        """Refuse a system op (``namespace`` "net" or "mnt") on a developer host
        (``--no-system``) unless the agent runs in a namespace of its own, as the
        unit tests run it; in a guest the whole machine is the agent's."""
        if not self.config.system and not isolated_from_host(namespace):
            raise AgentError(
                "EACCES", f"{op} refused: --no-system and no {namespace} namespace of its own (the host's)"
            )


def isolated_from_host(namespace: str) -> bool:
    """Whether this process is in another ``namespace`` (net, mnt) than the host:
    than PID 1, or where PID 1's namespaces cannot be read (a sandboxed host),
    than the process that started the agent."""
    try:
        own = os.readlink(f"/proc/self/ns/{namespace}")
    except OSError:
        return False
    for reference in ("1", str(os.getppid())):
        try:
            return os.readlink(f"/proc/{reference}/ns/{namespace}") != own
        except OSError:
            continue
    return False


def credit_entropy(seed: bytes) -> None:
    """Mix the host's seed into the kernel pool, crediting it when we may."""
    with open("/dev/random", "wb", buffering=0) as pool:
        try:
            request = struct.pack("ii", len(seed) * 8, len(seed)) + seed
            fcntl.ioctl(pool.fileno(), RNDADDENTROPY, request)
        except OSError:
            # not CAP_SYS_ADMIN: mixing it in uncredited is still worth it
            pool.write(seed)
        # The kernel reseeds its generator from the pool only every so often, so
        # until then VMs restored from one snapshot would read the same bytes
        # from /dev/urandom (seen under Linux 6.1): reseed it now.
        try:
            fcntl.ioctl(pool.fileno(), RNDRESEEDCRNG)
        except OSError:
            pass  # not CAP_SYS_ADMIN (a developer host): nothing more to do
