"""net_config: the guest's one network card, configured by the host's plan.

The host (kiln/net) decides the address, gateway and resolver; the agent applies
them to the interface with the host's MAC, at boot and again after every
restore, so the op replaces whatever was there rather than adding to it. It uses
busybox's ``ip`` (an imported OCI image may have no iproute2) and writes
resolv.conf itself."""

from __future__ import annotations

import ipaddress
import os
import re
import threading
from typing import Any

from .args import arg, timeout_arg
from .config import AgentConfig
from .deadlines import Deadline
from .errors import AgentError
from .files import write_atomically
from .system import System
from .tools import run_tool
from .wire import Emit, Handler

DEFAULT_TIMEOUT_SECONDS = 10.0
MAX_TIMEOUT_SECONDS = 120.0
MAX_NAMESERVERS = 3  # the C library reads no more than three
MAC_PATTERN = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
IPV6_SYSCTLS = "/proc/sys/net/ipv6/conf"


class Network:
    def __init__(self, config: AgentConfig, system: System) -> None:
        self.config = config
        self.system = system
        # One configuration at a time: two interleaved ones would mix their steps.
        self.lock = threading.Lock()

    def handlers(self) -> dict[str, Handler]:
        return {"net_config": self.op_net_config}

    def op_net_config(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        """{"mac", "address": "<ipv4>/<prefix>", "gateway", "nameservers": [..], "mtu"?,
        "timeout"=10} -> {"interface", "address", "gateway", "ipv6_disabled"}

        Idempotent: addresses and routes of the interface are flushed first, so
        calling it again (after a restore, or with a new address) leaves exactly
        this configuration."""
        mac = arg(args, "mac", str).lower()
        if not MAC_PATTERN.fullmatch(mac):
            raise AgentError("EINVAL", f"bad MAC address {mac!r}")
        try:
            interface = ipaddress.IPv4Interface(arg(args, "address", str))
            gateway = ipaddress.IPv4Address(arg(args, "gateway", str))
        except ValueError as exc:
            raise AgentError("EINVAL", f"bad address or gateway: {exc}") from None
        if "/" not in args["address"]:
            raise AgentError("EINVAL", "address needs its prefix length: <ipv4>/<prefix>")
        if gateway == interface.ip:
            raise AgentError("EINVAL", "the gateway cannot be the guest's own address")
        nameservers = nameservers_arg(args)
        mtu = arg(args, "mtu", int, None)
        if mtu is not None and not 68 <= mtu <= 65535:
            raise AgentError("EINVAL", "mtu must be between 68 and 65535")
        deadline = Deadline(timeout_arg(args, DEFAULT_TIMEOUT_SECONDS, MAX_TIMEOUT_SECONDS))
        self.system.require_own("net", "net_config")

        deadline.acquire(self.lock, "net_config")
        try:
            name = interface_with_mac(os.path.join(self.config.sys_dir, "class", "net"), mac)
            # IPv6 off before the link comes up: no link-local address, no router
            # solicitation, nothing the egress policy would have to refuse.
            ipv6_disabled = disable_ipv6(name)
            steps = [
                ["addr", "flush", "dev", name],
                ["-4", "route", "flush", "dev", name],
                *([["link", "set", "dev", name, "mtu", str(mtu)]] if mtu is not None else []),
                ["addr", "add", str(interface), "dev", name],
                ["link", "set", "dev", name, "up"],
                # A gateway outside the prefix (a /32 address) is reached on-link.
                [
                    "route",
                    "replace",
                    "default",
                    "via",
                    str(gateway),
                    "dev",
                    name,
                    *([] if gateway in interface.network else ["onlink"]),
                ],
                # A restored clone must not reuse its source's ARP entries.
                ["neigh", "flush", "dev", name],
            ]
            for step in steps:
                result = run_tool([self.config.busybox, "ip", *step], deadline, f"configuring {name}")
                if result.exit_code != 0 and not (step[0] == "neigh" and "Nothing to flush" in result.output):
                    raise AgentError(
                        "EIO", f"ip {' '.join(step)} failed ({result.exit_code}): {result.output}"
                    )
            write_atomically(os.path.join(self.config.etc_dir, "resolv.conf"), resolv_conf(nameservers))
        finally:
            self.lock.release()
        return {
            "interface": name,
            "address": str(interface),
            "gateway": str(gateway),
            "ipv6_disabled": ipv6_disabled,
        }


def nameservers_arg(args: dict[str, Any]) -> list[str]:
    servers = arg(args, "nameservers", list)
    if len(servers) > MAX_NAMESERVERS:
        raise AgentError("EINVAL", f"at most {MAX_NAMESERVERS} nameservers")
    checked = []
    for server in servers:
        try:
            checked.append(str(ipaddress.ip_address(server)))
        except ValueError:
            raise AgentError("EINVAL", f"bad nameserver {server!r}") from None
    return checked


def interface_with_mac(class_net: str, mac: str) -> str:
    """The name of the network interface whose MAC is ``mac``; ENOENT if none."""
    names = sorted(os.listdir(class_net)) if os.path.isdir(class_net) else []
    for name in names:
        try:
            with open(os.path.join(class_net, name, "address")) as address:
                if address.read().strip().lower() == mac:
                    return name
        except OSError:
            continue  # an interface that went away meanwhile
    raise AgentError(
        "ENOENT", f"no network interface has the MAC {mac} (found: {', '.join(names) or 'none'})"
    )


def disable_ipv6(name: str) -> bool:
    """IPv6 off on ``name`` and for interfaces yet to come; False where the
    kernel has no IPv6 at all (nothing to turn off)."""
    if not os.path.isdir(IPV6_SYSCTLS):
        return False
    for scope in ("all", "default", name):
        with open(os.path.join(IPV6_SYSCTLS, scope, "disable_ipv6"), "w") as sysctl:
            sysctl.write("1\n")
    return True


def resolv_conf(nameservers: list[str]) -> str:
    lines = ["# written by the kiln agent (net_config)"]
    lines += [f"nameserver {server}" for server in nameservers]
    return "\n".join(lines) + "\n"
