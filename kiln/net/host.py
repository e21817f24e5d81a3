"""The host as a whole: can it give VMs a filtered network, and Kiln's table on it.

``probe`` says why not when it cannot (not root, no nftables, no TUN, bad
settings): the participant then gives VMs no network at all, never an
unfiltered one, and the reason is shown in /healthz and VM records.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from kiln.config import Settings
from kiln.net import conntrack, netns, nft, tap
from kiln.net.addresses import AddressPlan, NetConfigError
from kiln.net.ruleset import HostRules, delete_host_table, host_table


@dataclass(frozen=True)
class NetStatus:
    """``mode``: ``filtered`` (VMs get networks under their policy) or ``off``
    (VMs get no network; ``reason`` says why)."""

    mode: str
    reason: str = ""

    @property
    def available(self) -> bool:
        return self.mode == "filtered"


def host_rules(settings: Settings, plan: AddressPlan) -> HostRules:
    return HostRules(
        table=settings.net_nft_table,
        plan=plan,
        uplink=settings.uplink,
        dns_port=settings.net_dns_port,
        proxy_port=settings.net_proxy_port,
        egress_mark=settings.net_egress_mark,
    )


def never_reachable(plan: AddressPlan) -> list[str]:
    """Kiln's own ranges: no policy opens them (other VMs, the host's link, the guest subnet)."""
    return [str(plan.pool), f"{plan.host_address}/32", str(plan.guest_subnet)]


def probe(settings: Settings) -> tuple[NetStatus, AddressPlan | None]:
    try:
        plan = AddressPlan.from_settings(settings)
        for cidr in settings.net_blocked_cidrs:
            ipaddress.IPv4Network(cidr)
    except (NetConfigError, ValueError) as error:
        return NetStatus("off", f"networking settings: {error}"), None
    if os.geteuid() != 0:
        return NetStatus("off", "kiln does not run as root: VMs get no network"), plan
    missing = [tool for tool in (netns.IP, conntrack.CONNTRACK) if shutil.which(tool) is None]
    if missing:
        return NetStatus("off", f"missing {', '.join(missing)}: VMs get no network"), plan
    if not Path(tap.TUN_DEVICE).exists():
        return NetStatus("off", f"no {tap.TUN_DEVICE}: VMs get no network"), plan
    try:
        nft.run([{"list": {"tables": {"family": "inet"}}}])
    except nft.NftError as error:
        return NetStatus("off", f"nftables does not work here ({error}): VMs get no network"), plan
    if settings.uplink and not Path("/sys/class/net", settings.uplink).exists():
        return NetStatus("off", f"KILN_UPLINK {settings.uplink!r} is no interface of this host"), plan
    return NetStatus("filtered"), plan


async def install(settings: Settings, plan: AddressPlan) -> None:
    """Kiln's table with its shared chains (atomically; VMs' own objects kept),
    and forwarding on the uplink so replies to VM traffic may pass."""
    await asyncio.to_thread(nft.run, host_table(host_rules(settings, plan)))
    if settings.uplink:
        # Forwarding is per receiving interface: replies arrive on the uplink.
        netns.write_sysctl(f"net/ipv4/conf/{settings.uplink}/forwarding", "1")


async def uninstall(settings: Settings) -> None:
    """Remove Kiln's table (tests, and an operator taking Kiln off a host)."""
    if nft.list_ruleset_of("inet", settings.net_nft_table):
        await asyncio.to_thread(nft.run, delete_host_table(settings.net_nft_table))
