"""What the test run leaves on the host: network namespaces, nftables tables,
links, QEMU processes and Kiln's daemons that were not there when it started.

Reported at the end of the run (``tests/conftest.py``), so a test that leaks
is found by the run that made it rather than by the next person's ``ip netns``.
It is a report, not a failure: other people's servers and test runs on the same
host make things of their own meanwhile, and only a run alone on its host
(CI) can tell its own leftovers for sure.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass


def _lines(command: list[str]) -> list[str]:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    return result.stdout.splitlines() if result.returncode == 0 else []


def _namespaces() -> set[str]:
    return {line.split()[0] for line in _lines(["ip", "netns", "list"]) if line.strip()}


def _nft_tables() -> set[str]:
    return {line.removeprefix("table ") for line in _lines(["nft", "list", "tables"]) if line.startswith("table ")}


def _links() -> set[str]:
    found = _lines(["ip", "-j", "link", "show"])
    return {link["ifname"] for link in json.loads("".join(found) or "[]")}


def _processes() -> set[str]:
    """QEMU and Kiln's own processes (server, daemons), by pid and command."""
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as file:
                argv = file.read().split(b"\0")
        except OSError:
            continue
        command = b" ".join(argv).decode(errors="replace").strip()
        if "qemu-system" in command or " -m kiln." in command or "/kiln serve" in command:
            found.add(f"{pid} {command[:160]}")
    return found


@dataclass(frozen=True)
class HostState:
    namespaces: set[str]
    nft_tables: set[str]
    links: set[str]
    processes: set[str]

    @classmethod
    def now(cls) -> HostState:
        return cls(_namespaces(), _nft_tables(), _links(), _processes())

    def added_since(self, before: HostState) -> dict[str, list[str]]:
        return {
            kind: sorted(getattr(self, kind) - getattr(before, kind))
            for kind in ("namespaces", "nft_tables", "links", "processes")
            if getattr(self, kind) - getattr(before, kind)
        }
