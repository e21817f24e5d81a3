"""Egress policies end to end: a real ``kiln serve`` (root, nftables, its egress
daemon), real VMs, the local outside world, and the API and SDK as clients use them.

One server serves the module. Its uplink is the world's, its guest DNS asks
the world's dnsmasq, and its package-manager group is a file naming one world
host (``api.allowed.test``). Every VM is deleted at the end, and then nothing
of the server's networking may be left: no ledger row (leases included), no
policy file, no nft chain or set of a VM, no namespace; once the server stops,
no link either (``live_server``).
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from egress_helpers import (
    NOT_RESOLVED,
    REFUSED_AT_CONNECT,
    curl,
    egress,
    guest_address,
    hold,
    nothing_left_eventually,
    outside_addresses,
    probe,
    release_hold,
    set_egress,
    statuses,
    world_env,
)
from instavm import InstaVM
from live_api import Api, live_server
from outside_world import RAW_PORT, OutsideWorld
from test_net_isolation import GUEST_HTTP_PORT, GUEST_SERVER, HostServer
from unit.harness import add_user

# Each test asserts about the traffic it caused alone.
pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("quiet_world")]

GUEST_ADDRESS = "198.19.255.254/30"


def raw_policy(world: OutsideWorld) -> dict[str, list[str]]:
    return {"allowed_cidrs": [f"{world.raw}/32"]}


def web_policy() -> dict[str, object]:
    return {"allowed_domains": ["allowed.test"], "allow_https": True}


@pytest.fixture(scope="module")
def group_file() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="kiln-egress-group-"))
    path = directory / "package-managers.toml"
    path.write_text('[world]\ndomains = ["api.allowed.test"]\n')
    yield path
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def api(world: OutsideWorld, group_file: Path) -> Iterator[Api]:
    env = world_env(world, KILN_EGRESS_PACKAGE_MANAGERS_FILE=str(group_file))
    # On every address of the host: a VM that could reach the host would reach the API.
    with live_server("kiln-egress-", env=env, listen="0.0.0.0") as served:
        try:
            yield served
        finally:
            # For a failure's report: what went wrong in the server.
            lines = served.server.log_tail(5000).splitlines()
            print("\n".join(line for line in lines if line.startswith(("WARNING", "ERROR")) or "reconcile" in line))
        for vm in served.http.get("/v1/vms").json():
            served.delete(vm["vm_id"])
        assert nothing_left_eventually(served.settings) == []


@pytest.fixture(scope="module")
def other_key(api: Api) -> str:
    """The API key of a second user of the server."""
    return asyncio.run(add_user(api.settings, "egress-other"))


def vm(api: Api, **fields: object) -> dict:
    return api.create_ok(**fields)


def test_health_says_vms_are_filtered(api: Api) -> None:
    health = api.http.get("/healthz").json()
    assert (health["status"], health["networking"]) == ("ok", {"mode": "filtered", "reason": None})


def test_no_policy_reaches_nothing(api: Api, world: OutsideWorld) -> None:
    created = vm(api)
    assert egress(api, created["vm_id"])["status"] == "applied"
    results = probe(
        api,
        created["session_id"],
        ("resolve", {"name": "allowed.test"}),
        ("tcp", {"host": world.allowed, "port": 443}),
        ("tcp", {"host": world.raw, "port": RAW_PORT}),
        ("udp", {"host": world.allowed, "port": 9999}),
        ("dns_udp", {"server": world.dns, "name": "allowed.test"}),
    )
    assert statuses(results) == ["dns-nxdomain", "refused", "refused", "unreachable", "unreachable"], results
    assert world.seen.to("raw") == [] and world.seen.to("allowed-https") == []
    api.delete(created["vm_id"])


def test_an_allowed_domain_over_its_schemes_and_nothing_else(api: Api, world: OutsideWorld) -> None:
    created = vm(api, egress_policy=web_policy())
    sid = created["session_id"]
    assert curl(api, sid, "https://allowed.test/") == (0, "allowed-https host=allowed.test\n")
    assert curl(api, sid, "http://allowed.test/")[0] == REFUSED_AT_CONNECT
    assert curl(api, sid, "https://denied.test/")[0] == NOT_RESOLVED
    assert curl(api, sid, f"--resolve allowed.test:443:{world.denied} https://allowed.test/")[0] == REFUSED_AT_CONNECT
    (raw,) = probe(api, sid, ("tcp", {"host": world.raw, "port": RAW_PORT}))
    assert raw["status"] == "refused", raw
    assert world.seen.to("denied-https") == [] and world.seen.to("allowed-http") == []
    api.delete(created["vm_id"])


def test_an_allowed_cidr_admits_raw_tcp(api: Api, world: OutsideWorld) -> None:
    created = vm(api, egress_policy=raw_policy(world))
    results = probe(
        api,
        created["session_id"],
        ("tcp", {"host": world.raw, "port": RAW_PORT, "send": "raw hello\n"}),
        ("tcp", {"host": world.allowed, "port": 80}),
        ("tcp", {"host": world.private, "port": RAW_PORT}),
    )
    assert (results[0]["status"], results[0]["detail"]) == ("ok", "raw hello\n"), results
    assert statuses(results)[1:] == ["refused", "refused"], results
    api.delete(created["vm_id"])


def test_the_package_manager_group_opens_its_domains_over_http_and_https(api: Api, world: OutsideWorld) -> None:
    created = vm(api, egress_policy={"allow_public_repos": True})
    sid = created["session_id"]
    policy = egress(api, created["vm_id"])
    assert (policy["allow_package_managers"], policy["allow_public_repos"], policy["allow_http"]) == (True, True, False)
    assert curl(api, sid, "http://api.allowed.test/") == (0, "allowed-http host=api.allowed.test\n")
    assert curl(api, sid, "https://api.allowed.test/") == (0, "allowed-https host=api.allowed.test\n")
    # Only the group's names: the same server under another name is not in it.
    assert curl(api, sid, "https://allowed.test/")[0] == NOT_RESOLVED
    api.delete(created["vm_id"])


def test_a_live_change_through_the_route_takes_effect_and_closes_what_it_forbids(
    api: Api, world: OutsideWorld, other_key: str
) -> None:
    created = vm(api, egress_policy=raw_policy(world))
    vm_id, sid = created["vm_id"], created["session_id"]
    hold(api, sid, "raw", world.raw, RAW_PORT)

    changed = set_egress(api, f"vm/{vm_id}", **web_policy())

    assert changed["status"] == "applied" and changed["allowed_cidrs"] == []
    seen = release_hold(api, sid, "raw")
    assert "second two" not in seen and ("second ConnectionResetError" in seen or "second eof" in seen), seen
    (raw,) = probe(api, sid, ("tcp", {"host": world.raw, "port": RAW_PORT}))
    assert raw["status"] == "refused", raw
    assert curl(api, sid, "https://allowed.test/")[0] == 0

    # A policy the host cannot enforce is a 422 naming the key; the old one stays.
    bad = api.http.post(f"/v1/egress/vm/{vm_id}", json={"allowed_cidrs": ["2001:db8::/32"]})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "allowed_cidrs"], bad.text
    assert egress(api, vm_id)["allowed_domains"] == ["allowed.test"]
    assert curl(api, sid, "https://allowed.test/")[0] == 0

    # Another user sees no such VM, and changes nothing.
    other = {"X-API-Key": other_key}
    for path in (f"/v1/egress/vm/{vm_id}", f"/v1/egress/session/{sid}"):
        assert api.http.post(path, json=raw_policy(world), headers=other).status_code == 404
        assert api.http.get(path, headers=other).status_code == 404

    # The session's route changes the same VM.
    back = set_egress(api, f"session/{sid}", **raw_policy(world))
    assert back["vm_id"] == vm_id
    (raw,) = probe(api, sid, ("tcp", {"host": world.raw, "port": RAW_PORT, "send": "again\n"}))
    assert (raw["status"], raw["detail"]) == ("ok", "again\n"), raw
    assert curl(api, sid, "https://allowed.test/")[0] == NOT_RESOLVED
    api.delete(vm_id)


def test_the_host_and_other_vms_are_unreachable_and_each_vm_has_its_own_address(api: Api, world: OutsideWorld) -> None:
    broad = {"allowed_cidrs": ["0.0.0.0/0"], "allowed_domains": ["*.test"], "allow_http": True, "allow_https": True}
    first, second = vm(api, egress_policy=broad), vm(api, egress_policy=broad)
    outside = outside_addresses(api)
    api_port = httpx.URL(api.server.url).port
    assert api_port is not None
    everywhere = HostServer("0.0.0.0")  # a host service on all addresses, loopback included
    try:
        # The host's addresses that stay while the test runs (other people's VM links come and go).
        targets = sorted({*default_route_addresses(), world.gateway, api.settings.net_host_address})
        results = probe(
            api,
            first["session_id"],
            *[("tcp", {"host": address, "port": port}) for address in targets for port in (api_port, everywhere.port)],
            ("tcp", {"host": "127.0.0.1", "port": everywhere.port}),  # the guest's own loopback, not the host's
            ("tcp", {"host": "169.254.169.254", "port": 80}),
            ("tcp", {"host": outside[second["vm_id"]], "port": GUEST_HTTP_PORT}),
            ("tcp", {"host": world.raw, "port": RAW_PORT, "send": "public\n"}),  # control: the policy works
        )
        assert set(statuses(results)[:-1]) == {"refused"}, results
        assert results[-1]["status"] == "ok", results[-1]
        assert everywhere.peers == []
        # Controls: both services answer at every one of those addresses from the host itself.
        for address in targets:
            assert httpx.get(f"http://{address}:{api_port}/healthz", timeout=5).status_code == 200, address
            with socket.create_connection((address, everywhere.port), 5) as sock:
                assert sock.recv(100) == b"host service\n"
    finally:
        everywhere.close()
    # The same guest address inside, an outside address of its own, and the host
    # reaches each VM there (and no other).
    assert outside[first["vm_id"]] != outside[second["vm_id"]]
    for created in (first, second):
        assert guest_address(api, created["session_id"]) == GUEST_ADDRESS
        api.run(created["session_id"], GUEST_SERVER)
    for created in (first, second):
        assert _http_get(outside[created["vm_id"]], GUEST_HTTP_PORT) == f"{created['vm_id']}\n"
    api.delete(first["vm_id"])
    api.delete(second["vm_id"])


def default_route_addresses() -> list[str]:
    """The IPv4 addresses of the host's interface with the default route (its real one)."""
    routes = subprocess.run(["ip", "-4", "-o", "route", "show", "default"], capture_output=True, text=True).stdout
    devices = {words[words.index("dev") + 1] for words in map(str.split, routes.splitlines()) if "dev" in words}
    addresses = []
    for device in devices:
        shown = subprocess.run(["ip", "-4", "-o", "address", "show", "dev", device], capture_output=True, text=True)
        addresses += [line.split()[3].split("/")[0] for line in shown.stdout.splitlines()]
    return addresses


def _http_get(address: str, port: int) -> str:
    with socket.create_connection((address, port), 10) as sock:
        sock.sendall(b"GET /index.html HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    return data.split(b"\r\n\r\n", 1)[1].decode()


def test_a_suspended_vm_takes_a_new_policy_at_resume(api: Api, world: OutsideWorld) -> None:
    created = vm(api, egress_policy=raw_policy(world))
    vm_id, sid = created["vm_id"], created["session_id"]
    before = outside_addresses(api)[vm_id]
    suspended = api.http.post(f"/v1/vms/{vm_id}/suspend")
    assert suspended.status_code == 200 and suspended.json()["status"] == "suspended", suspended.text
    assert vm_id not in outside_addresses(api)  # no network while it is saved

    changed = set_egress(api, f"vm/{vm_id}", **web_policy())
    assert changed["status"] == "pending"

    resumed = api.http.post(f"/v1/vms/{vm_id}/resume", params={"wait": True})
    assert resumed.status_code == 200 and resumed.json()["status"] == "running", resumed.text
    assert egress(api, vm_id)["status"] == "applied"
    assert curl(api, sid, "https://allowed.test/")[0] == 0
    (raw,) = probe(api, sid, ("tcp", {"host": world.raw, "port": RAW_PORT}))
    assert raw["status"] == "refused", raw
    assert guest_address(api, sid) == GUEST_ADDRESS and vm_id in outside_addresses(api)
    print(f"outside address before the suspend {before}, after the resume {outside_addresses(api)[vm_id]}")
    api.delete(vm_id)


def test_restored_and_cloned_vms_get_their_own_policy_and_address(api: Api, world: OutsideWorld) -> None:
    source = vm(api, egress_policy=raw_policy(world))
    snapshot = api.http.post(f"/v1/vms/{source['vm_id']}/snapshot", params={"wait": True}, json={"name": "egress"})
    assert snapshot.status_code == 200 and snapshot.json()["status"] == "ready", snapshot.text
    restored = vm(api, snapshot_id=snapshot.json()["snapshot_id"])
    inherited = _clone(api, source["vm_id"])
    own = _clone(api, source["vm_id"], egress_policy=web_policy())

    # From a snapshot: the create's own policy (none: deny all), never the source's.
    assert egress(api, restored["vm_id"])["allowed_cidrs"] == []
    # A clone: the source's, unless the clone request gives one.
    assert egress(api, inherited["vm_id"])["allowed_cidrs"] == [f"{world.raw}/32"]
    assert egress(api, own["vm_id"])["allowed_domains"] == ["allowed.test"]
    expected = {restored["vm_id"]: "refused", inherited["vm_id"]: "ok", own["vm_id"]: "refused"}
    for vm_id, status in expected.items():
        sid = api.vm(vm_id)["session_id"]
        (raw,) = probe(api, sid, ("tcp", {"host": world.raw, "port": RAW_PORT}))
        assert raw["status"] == status, (vm_id, raw)
        assert guest_address(api, sid) == GUEST_ADDRESS
    assert curl(api, own["session_id"], "https://allowed.test/")[0] == 0
    assert curl(api, inherited["session_id"], "https://allowed.test/")[0] == NOT_RESOLVED
    addresses = outside_addresses(api)
    everyone = [source["vm_id"], *expected]
    assert len({addresses[vm_id] for vm_id in everyone}) == len(everyone), addresses
    for vm_id in everyone:
        api.delete(vm_id)


def _clone(api: Api, vm_id: str, **fields: object) -> dict:
    response = api.http.post(f"/v1/vms/{vm_id}/clone", params={"wait": True}, json=fields)
    assert response.status_code == 200, response.text
    return response.json()


def test_the_sdk_egress_calls_work_unmodified(api: Api, world: OutsideWorld) -> None:
    client = InstaVM(api_key=api.server.admin_key, base_url=api.server.url, timeout=120)
    try:
        client.set_session_egress(
            allow_package_managers=False, allow_http=False, allow_https=False, allowed_cidrs=[f"{world.raw}/32"]
        )
        policy = client.get_session_egress()
        assert (policy["allowed_cidrs"], policy["allow_public_repos"], policy["status"]) == (
            [f"{world.raw}/32"],
            False,
            "applied",
        )
        reached = client.execute(
            f"import socket; s = socket.create_connection(('{world.raw}', {RAW_PORT}), 10); "
            "s.sendall(b'sdk\\n'); print(s.recv(10).decode().strip())"
        )
        assert reached["stdout"].strip() == "sdk", reached
        vm_id = policy["vm_id"]
        # The SDK's defaults: package managers, HTTP and HTTPS, no domains, no CIDRs.
        client.set_vm_egress(vm_id)
        after = client.get_vm_egress(vm_id)
        assert (after["allow_package_managers"], after["allowed_cidrs"], after["status"]) == (True, [], "applied")
        (raw,) = probe(api, client.session_id, ("tcp", {"host": world.raw, "port": RAW_PORT}))
        assert raw["status"] == "refused", raw
        assert curl(api, client.session_id, "http://api.allowed.test/")[0] == 0
    finally:
        client.kill()
