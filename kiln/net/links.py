"""One VM's wiring on the host: its namespace, veth pair, TAP and namespace rules.

::

    host namespace                         | VM namespace <prefix>ns-<n>         | guest
    <prefix>v<n>  host address/32  ========|== veth0  outside address/32       |
      route: outside/32 dev <prefix>v<n>   |   default via host address        |
                                           |   tap0  gateway/30  (fixed MAC) ~~|~~ eth0 guest/30
                                           |   nft: SNAT guest -> outside,     |
                                           |        DNAT outside -> guest,     |
                                           |        gateway:53 -> host DNS,    |
                                           |        IPv6 refused               |

The host-side address is the same on every VM link (one address, many links):
the guest DNS and the egress proxy listen on it once, for every VM.
"""

from __future__ import annotations

import json

from kiln.net import netns, nft, tap
from kiln.net.addresses import GATEWAY_MAC, INNER_VETH_NAME, TAP_NAME, AddressPlan, Lease
from kiln.net.ruleset import netns_table


async def create(plan: AddressPlan, lease: Lease, *, tap_uid: int, tap_gid: int, dns_port: int) -> None:
    """Make the veth pair (the namespace exists) and everything in the namespace.
    On failure what was made stays, for ``delete`` (the caller recorded it all)."""
    host = str(plan.host_address)
    await netns.run_ip(
        ["link", "add", lease.host_veth, "type", "veth", "peer", "name", INNER_VETH_NAME, "netns", lease.netns]
    )
    # Before the link is up: no IPv6 on it at all (no link-local address, no RA).
    netns.write_sysctl(f"net/ipv6/conf/{lease.host_veth}/disable_ipv6", "1")
    # Packets from this link may be forwarded (to the uplink, if the rules admit them).
    netns.write_sysctl(f"net/ipv4/conf/{lease.host_veth}/forwarding", "1")
    await netns.run_ip(
        [],
        batch=[
            f"address add {host}/32 dev {lease.host_veth}",
            f"link set {lease.host_veth} mtu {plan.mtu} up",
            f"route add {lease.outside_address}/32 dev {lease.host_veth} src {host}",
        ],
    )

    def inside() -> None:
        netns.write_sysctl("net/ipv4/ip_forward", "1")
        netns.write_sysctl(f"net/ipv6/conf/{INNER_VETH_NAME}/disable_ipv6", "1")
        tap.create_persistent(TAP_NAME, tap_uid, tap_gid)
        # IPv6 stays on tap0 only so that the namespace can refuse it out loud
        # (a reset, an ICMPv6 error); it never configures itself from the guest.
        for key, value in (("accept_ra", "0"), ("autoconf", "0"), ("forwarding", "0")):
            netns.write_sysctl(f"net/ipv6/conf/{TAP_NAME}/{key}", value)
        nft.run(netns_table(plan, lease, dns_port))
        netns.run_ip_sync(
            [],
            batch=[
                "link set lo up",
                f"link set {TAP_NAME} address {GATEWAY_MAC} mtu {plan.mtu} up",
                f"address add {plan.gateway}/{plan.guest_subnet.prefixlen} dev {TAP_NAME}",
                f"address add {lease.outside_address}/32 dev {INNER_VETH_NAME}",
                f"link set {INNER_VETH_NAME} mtu {plan.mtu} up",
                f"route add {host}/32 dev {INNER_VETH_NAME} scope link",
                f"route add default via {host} dev {INNER_VETH_NAME}",
                # Only for the namespace's refusals of IPv6 (resets, ICMPv6 errors),
                # which go back to whatever source address the guest used.
                f"route add ::/0 dev {TAP_NAME}",
            ],
        )

    await netns.run_in(lease.netns, inside)


async def open_tap(lease: Lease) -> int:
    """An fd on the VM's TAP, for QEMU (the caller closes it once QEMU has it)."""
    return await netns.run_in(lease.netns, lambda: tap.open_queue(TAP_NAME))


async def delete_link(name: str) -> None:
    """Delete a host link (both ends of a veth); nothing if it is gone."""
    if name in await host_links():
        try:
            await netns.run_ip(["link", "delete", name])
        except netns.NetnsError:
            if name in await host_links():
                raise


async def host_links() -> list[str]:
    return [link["ifname"] for link in json.loads(await netns.run_ip(["-json", "link", "show"]) or "[]")]
