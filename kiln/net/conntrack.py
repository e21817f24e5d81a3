"""Closing what a new policy forbids: the host's connection tracking entries of a VM.

The rules check every packet a VM sends, so a forbidden connection is refused
at its next packet anyway; deleting its entry as well stops the replies that
are still on their way and frees the masquerade mapping at once. Entries that
the kernel redirected to the egress proxy (their reply comes from the host's
link address) are left to the daemon, which closes its own connections.

Debian's ``conntrack`` command (conntrack-tools) does the netlink work.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)
CONNTRACK = "conntrack"


class ConntrackError(RuntimeError):
    pass


@dataclass(frozen=True)
class Flow:
    protocol: str
    source: str
    destination: str
    reply_source: str


def parse_flows(listing: str) -> list[Flow]:
    """``conntrack -L`` lines -> flows (original source/destination, reply source)."""
    flows = []
    for line in listing.splitlines():
        words = line.split()
        if not words or "=" in words[0]:
            continue
        sources = [word[4:] for word in words if word.startswith("src=")]
        destinations = [word[4:] for word in words if word.startswith("dst=")]
        if len(sources) < 2 or not destinations:
            continue
        flows.append(Flow(words[0], sources[0], destinations[0], sources[1]))
    return flows


async def _conntrack(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        CONNTRACK, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
    )
    stdout, stderr = await process.communicate()
    return process.returncode or 0, stdout.decode(errors="replace"), stderr.decode(errors="replace")


async def flows_from(address: str) -> list[Flow]:
    code, stdout, stderr = await _conntrack("-L", "-s", address)
    if code != 0:
        raise ConntrackError(f"conntrack -L -s {address}: {stderr.strip()}")
    return parse_flows(stdout)


async def close_forbidden(outside_address: str, allowed: Callable[[str], bool]) -> int:
    """Delete the VM's direct (not proxied) flows to destinations ``allowed``
    refuses; returns how many destinations were cut."""
    destinations = sorted(
        {
            flow.destination
            for flow in await flows_from(outside_address)
            # reply source == destination: no DNAT, so not the proxy's or the DNS's
            if flow.reply_source == flow.destination and not allowed(flow.destination)
        }
    )
    for destination in destinations:
        code, _, stderr = await _conntrack(
            "-D", "-s", outside_address, "-d", destination, "--reply-src", destination
        )
        # 1 with "0 flow entries": the flow ended meanwhile.
        if code != 0 and "0 flow entries" not in stderr:
            raise ConntrackError(f"conntrack -D -s {outside_address} -d {destination}: {stderr.strip()}")
    if destinations:
        log.info("closed the flows of %s to %s", outside_address, ", ".join(destinations))
    return len(destinations)
