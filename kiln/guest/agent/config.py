"""Where the agent acts: its paths and whether it may change the system.

A guest runs with the defaults. The unit tests run the agent on the developer
host with ``--no-system`` and point every path at a scratch directory, so no op
touches the host's clock, hostname, power, network, mounts or trust store."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AgentConfig:
    # Where exec, python and terminals start (and relative host paths resolve).
    workdir: str | None = None
    # False on a developer host: no clock, hostname or power changes, and the
    # network and mount ops refuse to run unless the agent has its own network
    # or mount namespace (see system.isolated_from_host).
    system: bool = True
    # environment, hostname, resolv.conf and ssl/certs/ca-certificates.crt live here.
    etc_dir: str = "/etc"
    # trust_ca keeps each certificate here too, where update-ca-certificates looks.
    local_ca_dir: str = "/usr/local/share/ca-certificates"
    # The busybox every Kiln guest carries (ip, mount, umount, sync).
    busybox: str = "/opt/kiln/busybox"
    # sysfs and devtmpfs: where disks and network interfaces are found.
    sys_dir: str = "/sys"
    dev_dir: str = "/dev"
