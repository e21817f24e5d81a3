"""The machine a run happened on, and per-process resource readings from /proc."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def describe_host(repo: Path) -> dict:
    """Static facts; the load average is sampled separately at start and end."""
    return {
        "hostname": platform.node(),
        "cpu_model": _cpu_model(),
        "cpus": os.cpu_count(),
        "memory_mb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "qemu": _first_line(["qemu-system-x86_64", "--version"]),
        "kiln_commit": _first_line(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"]),
        "kiln_tree_dirty": bool(_first_line(["git", "-C", str(repo), "status", "--porcelain"])),
    }


def load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def other_qemu_processes(own_root: Path) -> int:
    """QEMU processes on the host that are not this run's: other people's VMs,
    which share the CPUs with ours (the machine is shared)."""
    count = 0
    for pid in _pids():
        argv = _cmdline(pid)
        if argv and os.path.basename(argv[0]).startswith("qemu-system") and not any(
            str(own_root) in part for part in argv
        ):
            count += 1
    return count


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def _first_line(argv: list[str]) -> str:
    try:
        output = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return output.strip().splitlines()[0] if output.strip() else ""


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def processes_under(root: Path) -> list[int]:
    """QEMU processes whose command line names a path under ``root``: the ones
    this run started (directly or through its kiln server)."""
    marker = str(root)
    found = []
    for pid in _pids():
        argv = _cmdline(pid)
        if argv and os.path.basename(argv[0]).startswith("qemu-system") and any(
            marker in part for part in argv
        ):
            found.append(pid)
    return found


@dataclass(frozen=True)
class MemoryUse:
    rss_mb: float
    pss_mb: float


def memory_use(pid: int) -> MemoryUse | None:
    """RSS and PSS (shared pages divided among their users) of one process."""
    values: dict[str, float] = {}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in ("Rss", "Pss"):
                values[name] = int(rest.split()[0]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    if "Rss" not in values or "Pss" not in values:
        return None
    return MemoryUse(rss_mb=values["Rss"], pss_mb=values["Pss"])


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time the process used so far."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the parenthesised command name (which may contain spaces).
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def cpu_share(pids: list[int], window_seconds: float) -> dict[int, float]:
    """Percent of one core each process used over the window."""
    before = {pid: cpu_seconds(pid) for pid in pids}
    started = time.monotonic()
    time.sleep(window_seconds)
    elapsed = time.monotonic() - started
    shares = {}
    for pid in pids:
        after, earlier = cpu_seconds(pid), before[pid]
        if earlier is not None and after is not None:
            shares[pid] = 100.0 * (after - earlier) / elapsed
    return shares
