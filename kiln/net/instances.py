"""The networking settings of one Kiln server among several on one host.

Every name and range Kiln makes on a host comes from settings (the namespace
and link prefix, the nftables table, the outside pool, the host address, the
egress mark). Two servers with the same ones would take each other's
namespaces for strays and rewrite each other's table; two with the same mark
would refuse each other's proxied connections (each table refuses marked
packets that leave by another way than its own uplink). Test servers and
benchmarks run beside other people's servers, so each derives its own from a
seed (its data dir), here in one place.
"""

from __future__ import annotations

import hashlib
import subprocess


def separate_instance_env(seed: str) -> dict[str, str]:
    """``KILN_NET_*`` settings of their own for the server named by ``seed``
    (the same seed gives the same names, so a restarted server keeps them).
    Its outside pool and host address are the first /24s after the seed's own
    that nothing on the host routes to yet."""
    tag = hashlib.sha256(seed.encode()).hexdigest()
    number = int(tag[:8], 16)
    routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True, check=False).stdout
    for step in range(250):
        third = (number + step) % 250 + 1
        if f"198.18.{third}." not in routes and f"198.19.{third}." not in routes:
            break
    return {
        "KILN_NET_PREFIX": f"ks{tag[:4]}",
        "KILN_NET_NFT_TABLE": f"kiln_{tag[:8]}",
        "KILN_NET_OUTSIDE_POOL": f"198.18.{third}.0/24",
        "KILN_NET_HOST_ADDRESS": f"198.19.{third}.{(number >> 16) % 250 + 1}",
        "KILN_NET_EGRESS_MARK": str(0x4B490000 | int(tag[4:8], 16)),
    }
