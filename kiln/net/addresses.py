"""The address plan: what every VM's network looks like, and the names Kiln gives it.

Pure: no system calls. Everything is derived from the settings and a VM's lease
number ``n``, so a resource found on the host (by its name) tells which lease it
belongs to without any other state.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from kiln.config import Settings
from kiln.runtime.driver import GUEST_MAC

# Linux interface names are at most 15 bytes (IFNAMSIZ 16 with the NUL).
IFNAMSIZ = 15
# Inside each VM's namespace the names are fixed: the namespace is the scope.
TAP_NAME = "tap0"
INNER_VETH_NAME = "veth0"
# The TAP's own MAC (the guest's gateway): the same in every namespace, so a
# guest restored from a snapshot finds its ARP cache still right.
GATEWAY_MAC = "02:6b:69:6c:6e:01"
__all__ = ["GATEWAY_MAC", "GUEST_MAC", "AddressPlan", "Lease", "NetConfigError"]


class NetConfigError(ValueError):
    """The networking settings contradict each other."""


@dataclass(frozen=True)
class Lease:
    """One VM's slot: its number, its outside address and the host names that follow."""

    n: int
    outside_address: str
    netns: str
    host_veth: str

    @property
    def chain_prefix(self) -> str:
        return f"vm{self.n}"


@dataclass(frozen=True)
class AddressPlan:
    prefix: str
    pool: ipaddress.IPv4Network
    host_address: ipaddress.IPv4Address
    guest_subnet: ipaddress.IPv4Network
    mtu: int

    @classmethod
    def from_settings(cls, settings: Settings) -> AddressPlan:
        try:
            pool = ipaddress.IPv4Network(settings.net_outside_pool)
            host = ipaddress.IPv4Address(settings.net_host_address)
            guest = ipaddress.IPv4Network(settings.net_guest_subnet)
        except ValueError as error:
            raise NetConfigError(f"bad networking setting: {error}") from error
        if guest.num_addresses < 4:
            raise NetConfigError(f"KILN_NET_GUEST_SUBNET {guest} must hold a gateway and a guest (/30 or larger)")
        if host in pool or host in guest or pool.overlaps(guest):
            raise NetConfigError(
                f"the outside pool {pool}, the host address {host} and the guest subnet {guest} must not overlap"
            )
        if not re.fullmatch(r"[a-z][a-z0-9]*", settings.net_prefix):
            raise NetConfigError(f"KILN_NET_PREFIX {settings.net_prefix!r}: lower-case letters and digits only")
        plan = cls(settings.net_prefix, pool, host, guest, settings.net_mtu)
        longest = len(plan.host_veth_name(plan.max_lease))
        if longest > IFNAMSIZ:
            raise NetConfigError(
                f"KILN_NET_PREFIX {settings.net_prefix!r} is too long: {plan.host_veth_name(plan.max_lease)!r} "
                f"passes the {IFNAMSIZ}-byte interface name limit"
            )
        return plan

    # -- inside every namespace (the same for every VM)

    @property
    def gateway(self) -> str:
        return str(self.guest_subnet.network_address + 1)

    @property
    def guest_address(self) -> str:
        return str(self.guest_subnet.broadcast_address - 1)

    @property
    def guest_interface(self) -> str:
        """The guest's address with its prefix length, as ``net_config`` takes it."""
        return f"{self.guest_address}/{self.guest_subnet.prefixlen}"

    def guest_net_config(self) -> dict[str, object]:
        """The arguments of the guest agent's ``net_config`` op."""
        return {
            "mac": GUEST_MAC,
            "address": self.guest_interface,
            "gateway": self.gateway,
            "nameservers": [self.gateway],
            "mtu": self.mtu,
        }

    # -- leases

    @property
    def max_lease(self) -> int:
        # The pool's first and last addresses are not handed out.
        return self.pool.num_addresses - 2

    def lease(self, n: int) -> Lease:
        if not 1 <= n <= self.max_lease:
            raise ValueError(f"lease {n} is outside 1..{self.max_lease}")
        return Lease(
            n=n,
            outside_address=str(self.pool.network_address + n),
            netns=self.netns_name(n),
            host_veth=self.host_veth_name(n),
        )

    def lease_of_address(self, address: str) -> int | None:
        try:
            ip = ipaddress.IPv4Address(address)
        except ValueError:
            return None
        if ip not in self.pool:
            return None
        n = int(ip) - int(self.pool.network_address)
        return n if 1 <= n <= self.max_lease else None

    # -- host names

    def netns_name(self, n: int) -> str:
        return f"{self.prefix}ns-{n}"

    def host_veth_name(self, n: int) -> str:
        return f"{self.prefix}v{n}"

    @property
    def host_veth_pattern(self) -> str:
        """The nftables interface-name wildcard matching every VM link on the host."""
        return f"{self.prefix}v*"

    def lease_of_netns(self, name: str) -> int | None:
        return _number_after(f"{self.prefix}ns-", name)

    def lease_of_veth(self, name: str) -> int | None:
        return _number_after(f"{self.prefix}v", name)


def _number_after(head: str, name: str) -> int | None:
    if not name.startswith(head):
        return None
    tail = name[len(head) :]
    if not tail.isdigit() or tail.startswith("0"):
        return None
    return int(tail)
