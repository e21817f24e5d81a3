"""net_config on this host, inside a network namespace of the agent's own.

The agent runs under ``unshare --net --mount`` (sysfs mounted again, so
/sys/class/net lists the namespace's interfaces); the test adds a veth pair
whose guest end has the guest's MAC, and reads the result back with iproute2.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from unit.agent_process import (
    AgentConnection,
    host_busybox,
    require,
    require_root_namespaces,
    running_agent,
)

GUEST_MAC = "52:54:00:4b:49:4c"
# Its own namespaces, and the namespace's sysfs (sysfs shows the network
# devices of the namespace that mounted it).
NAMESPACE_PREFIX = (
    "unshare",
    "--net",
    "--mount",
    "--",
    "sh",
    "-c",
    'mount -t sysfs sysfs /sys && exec "$@"',
    "sh",
)


def in_agent_netns(agent: AgentConnection, *command: str) -> str:
    return subprocess.run(
        ["nsenter", "-t", str(agent.process.pid), "-n", *command], check=True, capture_output=True, text=True
    ).stdout


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentConnection]:
    require_root_namespaces()
    require(
        shutil.which("ip") is not None and shutil.which("nsenter") is not None, "needs iproute2 and nsenter"
    )
    etc = tmp_path / "etc"
    etc.mkdir()
    with running_agent(
        "--etc-dir", str(etc), "--busybox", host_busybox(), prefix=NAMESPACE_PREFIX
    ) as connection:
        connection.etc = etc
        assert connection.call("ping")  # the namespace is set up once the agent answers
        in_agent_netns(
            connection,
            "ip",
            "link",
            "add",
            "kg0",
            "address",
            GUEST_MAC,
            "type",
            "veth",
            "peer",
            "name",
            "kg1",
        )
        in_agent_netns(connection, "ip", "link", "set", "kg1", "up")
        yield connection


def addresses(agent: AgentConnection, name: str) -> list[str]:
    info = json.loads(in_agent_netns(agent, "ip", "-j", "addr", "show", "dev", name))[0]
    return [f"{a['local']}/{a['prefixlen']}" for a in info.get("addr_info", [])]


def test_the_interface_with_the_mac_gets_address_route_resolver_and_no_ipv6(agent: AgentConnection) -> None:
    in_agent_netns(agent, "ip", "link", "set", "kg0", "up")  # IPv6 link-local comes with it
    assert any(a.startswith("fe80:") for a in addresses(agent, "kg0"))
    value = agent.call(
        "net_config",
        mac=GUEST_MAC.upper(),
        address="10.11.0.2/30",
        gateway="10.11.0.1",
        nameservers=["10.11.0.1", "192.0.2.53"],
        mtu=1400,
    )
    assert value["interface"] == "kg0" and value["ipv6_disabled"] is True
    assert addresses(agent, "kg0") == ["10.11.0.2/30"]
    link = json.loads(in_agent_netns(agent, "ip", "-j", "link", "show", "dev", "kg0"))[0]
    assert link["mtu"] == 1400 and "UP" in link["flags"]
    routes = json.loads(in_agent_netns(agent, "ip", "-j", "route", "show", "default"))
    assert [(r["gateway"], r["dev"]) for r in routes] == [("10.11.0.1", "kg0")]
    for scope in ("all", "default", "kg0"):
        assert in_agent_netns(agent, "cat", f"/proc/sys/net/ipv6/conf/{scope}/disable_ipv6").strip() == "1"
    resolv = (agent.etc / "resolv.conf").read_text()
    assert [line for line in resolv.splitlines() if not line.startswith("#")] == [
        "nameserver 10.11.0.1",
        "nameserver 192.0.2.53",
    ]


def test_calling_again_replaces_the_configuration_and_flushes_neighbours(agent: AgentConnection) -> None:
    agent.call("net_config", mac=GUEST_MAC, address="10.11.0.2/30", gateway="10.11.0.1", nameservers=[])
    in_agent_netns(
        agent,
        "ip",
        "neigh",
        "replace",
        "10.11.0.1",
        "lladdr",
        "02:00:00:00:00:01",
        "dev",
        "kg0",
        "nud",
        "reachable",
    )
    again = {
        "mac": GUEST_MAC,
        "address": "10.11.0.2/30",
        "gateway": "10.11.0.1",
        "nameservers": ["10.11.0.1"],
    }
    agent.call("net_config", **again)
    agent.call("net_config", **again)
    assert addresses(agent, "kg0") == ["10.11.0.2/30"]
    assert "02:00:00:00:00:01" not in in_agent_netns(agent, "ip", "neigh", "show", "dev", "kg0")
    # A /32 address with its gateway outside the prefix: the route is on-link.
    agent.call("net_config", mac=GUEST_MAC, address="100.64.7.2/32", gateway="100.64.7.1", nameservers=[])
    assert addresses(agent, "kg0") == ["100.64.7.2/32"]
    routes = json.loads(in_agent_netns(agent, "ip", "-j", "route", "show", "default"))
    assert [(r["gateway"], r["dev"], r.get("flags")) for r in routes] == [("100.64.7.1", "kg0", ["onlink"])]


def test_bad_arguments_and_an_unknown_mac(agent: AgentConnection) -> None:
    good = {"mac": GUEST_MAC, "address": "10.11.0.2/30", "gateway": "10.11.0.1", "nameservers": ["10.11.0.1"]}
    assert agent.error("net_config", **{**good, "mac": "02:00:00:00:00:99"}) == "ENOENT"
    assert agent.error("net_config", **{**good, "mac": "not-a-mac"}) == "EINVAL"
    assert agent.error("net_config", **{**good, "address": "10.11.0.2"}) == "EINVAL"  # no prefix
    assert agent.error("net_config", **{**good, "address": "fd00::2/64"}) == "EINVAL"
    assert agent.error("net_config", **{**good, "gateway": "10.11.0.2"}) == "EINVAL"  # itself
    assert agent.error("net_config", **{**good, "nameservers": ["1.1.1.1"] * 4}) == "EINVAL"
    assert agent.error("net_config", **{**good, "nameservers": ["dns.example"]}) == "EINVAL"
    assert agent.error("net_config", **{**good, "mtu": 20}) == "EINVAL"
    assert agent.error("net_config", **{**good, "timeout": 0}) == "EINVAL"
    assert addresses(agent, "kg0") == []


def test_without_a_namespace_of_its_own_the_host_network_is_refused(tmp_path: Path) -> None:
    # --no-system in the host's namespace: refused before any interface is looked at.
    with running_agent("--etc-dir", str(tmp_path)) as agent:
        assert (
            agent.error(
                "net_config", mac=GUEST_MAC, address="10.11.0.2/30", gateway="10.11.0.1", nameservers=[]
            )
            == "EACCES"
        )
    assert not (tmp_path / "resolv.conf").exists()
