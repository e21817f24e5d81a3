"""What no policy opens: the host's own services and other VMs; and VMs restored
from one snapshot, each with the same guest address and its own outside address."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import threading
from collections.abc import Iterator

import pytest
from guest_probes import probe, statuses
from guest_shell import shell
from net_fixtures import NetVmFactory
from outside_world import OutsideWorld

from kiln.config import Settings
from kiln.net.participant import NetParticipant
from kiln.node.participant import EgressRules

pytestmark = pytest.mark.vm

GUEST_HTTP_PORT = 8000
# Serves its hostname (the vm_id) on GUEST_HTTP_PORT, in the background.
GUEST_SERVER = (
    "cd /tmp && hostname > index.html && "
    f"(setsid python3 -m http.server {GUEST_HTTP_PORT} --bind 0.0.0.0 >/dev/null 2>&1 &) && "
    "for i in $(seq 100); do python3 -c \"import socket; socket.create_connection(('127.0.0.1', "
    f'{GUEST_HTTP_PORT}), 1)" 2>/dev/null && exit 0; sleep 0.1; done; exit 1'
)


class HostServer:
    """A TCP server of the host (all addresses, loopback included) that counts who connected."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((address, 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.peers: list[str] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                connection, peer = self.sock.accept()
            except OSError:
                return
            self.peers.append(peer[0])
            with contextlib.suppress(OSError), connection:
                connection.sendall(b"host service\n")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


@pytest.fixture
def host_servers() -> Iterator[tuple[HostServer, HostServer]]:
    everywhere, loopback = HostServer("0.0.0.0"), HostServer("127.0.0.1")
    yield everywhere, loopback
    everywhere.close()
    loopback.close()


def host_addresses() -> list[str]:
    """The host's own global IPv4 addresses (its real interfaces included)."""
    out = subprocess.run(
        ["ip", "-4", "-o", "address", "show", "scope", "global"], capture_output=True, text=True, check=True
    ).stdout
    return sorted({line.split()[3].split("/")[0] for line in out.splitlines()})


async def test_the_host_is_unreachable_whatever_the_policy(
    net_vm: NetVmFactory, world: OutsideWorld, egress_settings: Settings, host_servers: tuple[HostServer, HostServer]
) -> None:
    everywhere, loopback = host_servers
    # The broadest policy there is: every public address, every web name.
    vm = await net_vm(
        EgressRules(allowed_cidrs=("0.0.0.0/0",), allowed_domains=("*.test",), allow_http=True, allow_https=True)
    )
    targets = sorted({*host_addresses(), world.gateway, egress_settings.net_host_address})
    results = await probe(
        vm,
        *[("tcp", {"host": address, "port": everywhere.port}) for address in targets],
        ("tcp", {"host": egress_settings.net_host_address, "port": egress_settings.net_proxy_port}),
        ("tcp", {"host": "169.254.169.254", "port": 80}),
        ("tcp", {"host": world.raw, "port": 7000, "send": "public\n"}),  # control: the policy works
    )
    assert set(statuses(results)[:-1]) == {"refused"}, list(zip([*targets, "proxy", "metadata"], results, strict=False))
    assert results[-1]["status"] == "ok", results[-1]
    # The same services answer the host itself (the probes could have reached them).
    for address in ("127.0.0.1", *host_addresses()):
        with socket.create_connection((address, everywhere.port), 5) as sock:
            assert sock.recv(100) == b"host service\n"
    with socket.create_connection(("127.0.0.1", loopback.port), 5):
        pass
    assert set(everywhere.peers) <= {"127.0.0.1", *host_addresses()}
    assert len(loopback.peers) == 1


async def test_other_vms_are_unreachable_and_each_restore_has_its_own_outside_address(
    net_vm: NetVmFactory, network: NetParticipant, world: OutsideWorld
) -> None:
    first, second = await asyncio.gather(
        net_vm(EgressRules(allowed_cidrs=("0.0.0.0/0",), allowed_domains=("allowed.test",), allow_https=True)),
        net_vm(EgressRules(allowed_domains=("allowed.test",), allow_https=True)),
    )
    outside = [network.outside_address_of(vm.vm_id) for vm in (first, second)]
    assert None not in outside and outside[0] != outside[1]
    for vm in (first, second):
        addresses = await vm.run("ip -4 -o address show dev eth0")
        assert " 198.19.255.254/30 " in addresses.stdout, addresses
        ran = await vm.run("curl -sS -k --max-time 15 https://allowed.test/")
        assert ran.stdout == "allowed-https host=allowed.test\n", ran
        assert (await vm.run(GUEST_SERVER)).exit_code == 0
    # The host reaches each guest at its own outside address (how shares will route).
    for vm, address in zip((first, second), outside, strict=True):
        assert await http_get(address, GUEST_HTTP_PORT) == f"{vm.vm_id}\n"
    # Neither VM reaches the other, by its outside address or the shared guest address.
    results = await probe(
        first,
        ("tcp", {"host": outside[1], "port": GUEST_HTTP_PORT}),
        ("tcp", {"host": "198.19.255.254", "port": 9}),
    )
    assert statuses(results) == ["refused", "refused"], results


async def http_get(address: str, port: int) -> str:
    def get() -> str:
        with socket.create_connection((address, port), 10) as sock:
            sock.sendall(b"GET /index.html HTTP/1.0\r\n\r\n")
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
        return data.split(b"\r\n\r\n", 1)[1].decode()

    return await asyncio.to_thread(get)


async def test_a_restored_snapshot_of_a_wired_vm_gets_the_new_vms_policy(
    net_vm: NetVmFactory, hypervisor, world: OutsideWorld, tmp_path
) -> None:
    source = await net_vm(EgressRules(allowed_cidrs=(f"{world.raw}/32",)))
    assert (await probe(source, ("tcp", {"host": world.raw, "port": 7000})))[0]["status"] == "ok"
    saved = await hypervisor.save(source.machine, tmp_path / "saved")
    try:
        clone = await net_vm(EgressRules(allowed_domains=("allowed.test",), allow_https=True), saved=saved)
        results = await probe(
            clone,
            ("tcp", {"host": world.raw, "port": 7000}),
            ("resolve", {"name": "allowed.test"}),
        )
        assert results[0]["status"] == "refused", results
        assert results[1]["detail"] == [world.allowed], results
    finally:
        # save() leaves its files read-only; let pytest remove them
        for path in tmp_path.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)


async def test_a_snapshot_of_a_wired_vm_restores_without_a_network(
    net_vm: NetVmFactory, hypervisor, boot_image, egress_settings: Settings, world: OutsideWorld, tmp_path
) -> None:
    """Every NIC offers the same features, wired or not (no vnet header on the
    TAP), so a wired VM's saved state also restores where the host gives no
    network (and the bench's raw baselines can restore it by hand)."""
    import uuid

    from kiln.runtime.driver import MachineSpec

    source = await net_vm(EgressRules(allowed_cidrs=(f"{world.raw}/32",)))
    saved = await hypervisor.save(source.machine, tmp_path / "saved")
    vm_id = f"u{uuid.uuid4().hex[:10]}"
    run_dir = egress_settings.vms_dir / vm_id
    try:
        machine = await hypervisor.start(
            MachineSpec(
                vm_id=vm_id, vcpu_count=saved.vcpu_count, memory_mb=saved.memory_mb, image=boot_image,
                run_dir=run_dir, restore_from=saved,
            )
        )  # fmt: skip
        await machine.wait_ready(egress_settings.boot_timeout_seconds)
        seen = len(world.seen.to("raw"))
        connect = f"import socket; socket.create_connection(('{world.raw}', 7000), 5)"
        outcome = await shell(machine, f'python3 -c "{connect}" 2>/dev/null && echo reached || echo not-reached')
        assert outcome.strip() == "not-reached" and len(world.seen.to("raw")) == seen
    finally:
        await hypervisor.destroy(vm_id, run_dir)
        for path in tmp_path.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
