"""The agent's system ops in real VMs: net_config, mount/umount, fsfreeze/fsthaw,
disk_usage, trust_ca.

Every VM is restored from a base snapshot (well under a second, not a boot),
with what a test wires to it at start: a TAP device moved into a network
namespace the test owns (its "outside": an address the guest pings and that
pings the guest), or an ext4 image on the virtio-scsi bus. A disk is also
hot-added over QMP. Everything is removed at the end, pass or fail: the VMs
(by the fixture), the namespaces, the images.
"""

from __future__ import annotations

import asyncio
import base64
import fcntl
import os
import shutil
import struct
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from integration.guest_shell import shell
from unit.agent_process import host_busybox, require
from unit.certs import make_ca, make_server_certificate

from kiln.config import Settings
from kiln.runtime.agent_client import AgentError
from kiln.runtime.driver import (
    GUEST_MAC,
    BootImage,
    MachineSpec,
    Nic,
    SavedState,
    ScsiDrive,
)
from kiln.runtime.images import ImageStore
from kiln.runtime.qemu import QEMU_BINARY, QemuHypervisor, QemuMachine
from kiln.runtime.snapshots import BaseSnapshots, Shape, reset_identity

pytestmark = pytest.mark.vm

SHAPE = Shape(memory_mb=256, vcpu_count=1)
TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000
GUEST_ADDRESS, OUTSIDE_ADDRESS = "10.77.0.2", "10.77.0.1"

RestoreWith = Callable[..., Awaitable[QemuMachine]]


def require_root_and(*tools: str) -> None:
    require(os.geteuid() == 0, "needs root (TAP devices, network namespaces, loop-free ext4 images)")
    for tool in tools:
        require(shutil.which(tool) is not None, f"needs {tool}")


# ---- the host side: a TAP in a namespace, ext4 images


@dataclass
class Outside:
    """A network namespace holding the VM's TAP, with an address on it."""

    namespace: str
    tap_fd: int

    def run(self, *command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.namespace, *command], capture_output=True, text=True, check=False
        )


@pytest.fixture
def outside() -> Iterator[Outside]:
    require_root_and("ip")
    require(os.path.exists("/dev/net/tun"), "needs /dev/net/tun")
    suffix = uuid.uuid4().hex[:8]
    namespace, tap = f"kiln-gt-{suffix}", f"kgt{suffix}"
    tap_fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    fcntl.ioctl(tap_fd, TUNSETIFF, struct.pack("16sH22x", tap.encode(), IFF_TAP | IFF_NO_PI))
    subprocess.run(["ip", "netns", "add", namespace], check=True)
    try:
        # A TAP moved to another namespace stays attached to its fd.
        for command in (
            ["ip", "link", "set", tap, "netns", namespace],
            ["ip", "netns", "exec", namespace, "ip", "addr", "add", f"{OUTSIDE_ADDRESS}/24", "dev", tap],
            ["ip", "netns", "exec", namespace, "ip", "link", "set", tap, "up"],
        ):
            subprocess.run(command, check=True)
        yield Outside(namespace, tap_fd)
    finally:
        os.close(tap_fd)
        subprocess.run(["ip", "netns", "del", namespace], check=False)


def make_volume(path: Path, files: dict[str, bytes], size_mb: int = 48) -> Path:
    tree = path.with_suffix(".tree")
    tree.mkdir()
    for name, data in files.items():
        (tree / name).write_bytes(data)
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-L", "vol", "-d", str(tree), str(path), f"{size_mb}M"], check=True
    )
    shutil.rmtree(tree)
    return path


def read_from_volume(image: Path, name: str) -> str:
    return subprocess.run(
        ["debugfs", "-R", f"cat /{name}", str(image)], capture_output=True, text=True, check=True
    ).stdout


def assert_filesystem_clean(image: Path) -> None:
    check = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout


# ---- VMs


@pytest.fixture(scope="module")
def this_image(vm_settings: Settings) -> Callable[[str], BootImage]:
    """The variant built from this checkout (built or found in the cache): the
    cache is shared, and its ``<variant>.current`` may name another checkout's
    build, with another agent."""
    require_root_and(QEMU_BINARY, "mmdebstrap")
    store = ImageStore(vm_settings)
    built: dict[str, BootImage] = {}

    def get(variant: str) -> BootImage:
        if variant not in built:
            built[variant] = store.build(variant)
        return built[variant]

    return get


@pytest.fixture
async def restore_with(
    hypervisor: QemuHypervisor, this_image: Callable[[str], BootImage], vm_settings: Settings
) -> AsyncIterator[RestoreWith]:
    """``await restore_with(nic=..., scsi_drives=..., variant="default", saved=None)``:
    a VM restored from ``saved`` (default: the variant's base snapshot) with devices
    wired at start, its identity reset. Every VM is destroyed when the test ends."""
    started: list[str] = []
    snapshots = BaseSnapshots(vm_settings, hypervisor)

    async def restore(
        *,
        nic: Nic | None = None,
        scsi_drives: tuple[ScsiDrive, ...] = (),
        variant: str = "default",
        saved: SavedState | None = None,
    ) -> QemuMachine:
        image = this_image(variant)
        saved = saved or await snapshots.ensure(image, SHAPE)
        vm_id = f"g{uuid.uuid4().hex[:10]}"
        started.append(vm_id)
        machine = await hypervisor.start(
            MachineSpec(
                vm_id=vm_id,
                vcpu_count=saved.vcpu_count,
                memory_mb=saved.memory_mb,
                image=image,
                run_dir=vm_settings.vms_dir / vm_id,
                restore_from=saved,
                nic=nic or Nic(),
                scsi_drives=scsi_drives,
            )
        )
        await machine.wait_ready(vm_settings.boot_timeout_seconds)
        await reset_identity(machine, vm_id)
        return machine

    try:
        yield restore
    finally:
        for vm_id in started:
            await hypervisor.destroy(vm_id, vm_settings.vms_dir / vm_id)


async def exit_code(machine: QemuMachine, command: str) -> int:
    value = await machine.agent.call("exec", shell=command, timeout=60)
    return int(value["exit_code"])


async def error_of(machine: QemuMachine, op: str, **args: object) -> AgentError:
    with pytest.raises(AgentError) as raised:
        await machine.agent.call(op, timeout=90, **args)
    return raised.value


async def configure_and_ping(machine: QemuMachine, outside: Outside) -> None:
    value = await machine.agent.call(
        "net_config",
        timeout=30,
        mac=GUEST_MAC,
        address=f"{GUEST_ADDRESS}/24",
        gateway=OUTSIDE_ADDRESS,
        nameservers=[OUTSIDE_ADDRESS],
    )
    assert value["interface"] == "eth0" and value["ipv6_disabled"] is True
    # Both ways: the outside reaches the guest's address, the guest its gateway.
    pinged = outside.run(host_busybox(), "ping", "-c", "3", "-W", "10", GUEST_ADDRESS)
    assert pinged.returncode == 0, pinged.stdout + pinged.stderr
    assert await exit_code(machine, f"/opt/kiln/busybox ping -c 3 -W 10 {OUTSIDE_ADDRESS}") == 0
    assert (await shell(machine, "cat /etc/resolv.conf")).splitlines()[-1] == f"nameserver {OUTSIDE_ADDRESS}"
    assert (await shell(machine, "cat /proc/sys/net/ipv6/conf/eth0/disable_ipv6")).strip() == "1"
    assert (await shell(machine, "/opt/kiln/busybox ip -6 addr show dev eth0")).strip() == ""


# ---- networking


async def test_net_config_wires_the_guest_to_the_outside_and_is_idempotent(
    outside: Outside, restore_with: RestoreWith
) -> None:
    machine = await restore_with(nic=Nic(tap_fd=outside.tap_fd))
    await configure_and_ping(machine, outside)
    # Idempotent: again, and with a new address, exactly one address remains.
    await configure_and_ping(machine, outside)
    routes = await shell(machine, "/opt/kiln/busybox ip route")
    assert routes.splitlines()[0].startswith(f"default via {OUTSIDE_ADDRESS} dev eth0"), routes
    addresses = await shell(machine, "/opt/kiln/busybox ip -4 addr show dev eth0")
    assert addresses.count("inet ") == 1, addresses
    error = await error_of(
        machine,
        "net_config",
        mac="02:00:00:00:00:99",
        address="10.1.0.2/24",
        gateway="10.1.0.1",
        nameservers=[],
    )
    assert error.code == "ENOENT"


async def test_the_minimal_variant_gets_network_and_checked_volumes_without_iproute2(
    outside: Outside, restore_with: RestoreWith, tmp_path: Path
) -> None:
    require_root_and("mkfs.ext4")
    volume = make_volume(tmp_path / "minimal.ext4", {"data.txt": b"on a volume\n"})
    machine = await restore_with(
        nic=Nic(tap_fd=outside.tap_fd),
        variant="minimal",
        scsi_drives=(ScsiDrive("kiln-minimal-vol", volume, image_format="raw"),),
    )
    assert await exit_code(machine, "command -v ip") != 0, "the minimal variant has no iproute2"
    await configure_and_ping(machine, outside)
    mounted = await machine.agent.call(
        "mount", timeout=120, serial="kiln-minimal-vol", mount_path="/data", read_only=False, fsck=True
    )
    assert mounted["fsck"]["exit_code"] == 0, mounted
    assert await shell(machine, "cat /data/data.txt") == "on a volume\n"


# ---- volumes


async def test_a_volume_attached_at_start_is_mounted_used_frozen_and_detached(
    restore_with: RestoreWith, tmp_path: Path
) -> None:
    require_root_and("mkfs.ext4", "debugfs")
    serial = "kiln-vol-0123456789abcdef"
    image = make_volume(tmp_path / "volume.ext4", {"hello.txt": b"hello from the host\n"})
    machine = await restore_with(scsi_drives=(ScsiDrive(serial, image, image_format="raw"),))

    # The base snapshot's guest never saw this disk: mount finds it by rescanning.
    mounted = await machine.agent.call(
        "mount", timeout=120, serial=serial, mount_path="/mnt/vol", read_only=False, fsck=True
    )
    device = mounted["device"]
    assert device.startswith("/dev/sd") and mounted["mount_path"] == "/mnt/vol"
    assert mounted["fsck"]["mode"] == "preen" and mounted["fsck"]["exit_code"] == 0, mounted["fsck"]
    assert await shell(machine, "cat /mnt/vol/hello.txt") == "hello from the host\n"
    options = (await shell(machine, "grep ' /mnt/vol ' /proc/self/mountinfo")).split()[5].split(",")
    assert options[0] == "rw" and {"nosuid", "nodev"} <= set(options)
    await shell(machine, "echo written in the guest > /mnt/vol/new.txt")

    usage = await machine.agent.call("disk_usage", timeout=30, path="/mnt/vol")
    assert 32 * 2**20 < usage["total_bytes"] <= 48 * 2**20
    assert 0 < usage["used_bytes"] and 0 < usage["free_bytes"] < usage["total_bytes"]

    again = await machine.agent.call(
        "mount", timeout=60, serial=serial, mount_path="/mnt/vol", read_only=False
    )
    assert again["already_mounted"] is True
    assert (
        await error_of(machine, "mount", serial=serial, mount_path="/mnt/other", read_only=False)
    ).code == "EBUSY"

    # A freeze is the kernel's: a second one is refused by it, a thaw accepted.
    assert await machine.agent.call("fsfreeze", timeout=30, mount_path="/mnt/vol") == {
        "already_frozen": False
    }
    assert await machine.agent.call("fsfreeze", timeout=30, mount_path="/mnt/vol") == {"already_frozen": True}
    assert (await error_of(machine, "umount", mount_path="/mnt/vol")).code == "EBUSY"
    thawed = await machine.agent.call("fsthaw", timeout=30, mount_path="/mnt/vol")
    assert thawed == {"thawed": True, "auto_thawed": False}

    # A process holding the mount: named in the EBUSY, killed with force.
    await shell(machine, "cd /mnt/vol && setsid sleep 600 </dev/null >/dev/null 2>&1 &")
    busy = await error_of(machine, "umount", mount_path="/mnt/vol", serial=serial)
    assert busy.code == "EBUSY" and "(sleep)" in busy.message, busy.message
    name = device.removeprefix("/dev/")
    assert (await shell(machine, f"test -e /sys/block/{name} && echo present")).strip() == "present"
    value = await machine.agent.call("umount", timeout=90, mount_path="/mnt/vol", serial=serial, force=True)
    assert value == {"unmounted": True, "deleted_device": device}
    assert await exit_code(machine, f"test -e /sys/block/{name}") != 0, "the disk is gone from the guest"
    assert await exit_code(machine, "pgrep -x sleep") != 0
    assert read_from_volume(image, "new.txt") == "written in the guest\n"


async def test_a_mount_survives_a_snapshot_and_mounting_again_after_the_restore_is_a_no_op(
    restore_with: RestoreWith, hypervisor: QemuHypervisor, vm_settings: Settings, tmp_path: Path
) -> None:
    require_root_and("mkfs.ext4", "e2fsck")
    image = make_volume(tmp_path / "kept.ext4", {"first.txt": b"before the snapshot\n"})
    drives = (ScsiDrive("kiln-kept-vol", image, image_format="raw"),)
    source = await restore_with(scsi_drives=drives)
    await source.agent.call("mount", timeout=120, serial="kiln-kept-vol", mount_path="/kept", read_only=False)
    await shell(source, "echo in the snapshot > /kept/second.txt && sync")
    # Stopped by the save: one writer on the volume at a time.
    saved = await hypervisor.save(source, vm_settings.snapshots_dir / source.vm_id, keep_running=False)

    restored = await restore_with(scsi_drives=drives, saved=saved)
    again = await restored.agent.call(
        "mount", timeout=120, serial="kiln-kept-vol", mount_path="/kept", read_only=False
    )
    assert again["already_mounted"] is True
    assert (
        await shell(restored, "cat /kept/first.txt /kept/second.txt")
        == "before the snapshot\nin the snapshot\n"
    )
    await shell(restored, "echo after the restore > /kept/third.txt")
    value = await restored.agent.call("umount", timeout=60, mount_path="/kept", serial="kiln-kept-vol")
    assert value["unmounted"] is True and value["deleted_device"]
    assert read_from_volume(image, "third.txt") == "after the restore\n"
    assert_filesystem_clean(image)


async def test_a_read_only_disk_mounts_read_only_only(restore_with: RestoreWith, tmp_path: Path) -> None:
    require_root_and("mkfs.ext4")
    image = make_volume(tmp_path / "ro.ext4", {"kept.txt": b"unchanged\n"})
    before = image.read_bytes()
    machine = await restore_with(
        scsi_drives=(ScsiDrive("kiln-ro-vol", image, read_only=True, image_format="raw"),)
    )
    refused = await error_of(machine, "mount", serial="kiln-ro-vol", mount_path="/ro", read_only=False)
    assert refused.code == "EACCES"
    mounted = await machine.agent.call(
        "mount", timeout=120, serial="kiln-ro-vol", mount_path="/ro", read_only=True, fsck=True
    )
    assert mounted["fsck"]["mode"] == "check" and mounted["read_only"] is True
    options = (await shell(machine, "grep ' /ro ' /proc/self/mountinfo")).split()[5].split(",")
    assert options[0] == "ro"
    assert await shell(machine, "cat /ro/kept.txt") == "unchanged\n"
    assert await exit_code(machine, "touch /ro/new") != 0
    assert (await machine.agent.call("umount", timeout=60, mount_path="/ro", serial="kiln-ro-vol"))[
        "unmounted"
    ]
    assert image.read_bytes() == before


async def test_a_hot_added_disk_is_waited_for_and_a_missing_one_is_enoent(
    restore_with: RestoreWith, tmp_path: Path
) -> None:
    require_root_and("mkfs.ext4")
    image = make_volume(tmp_path / "hot.ext4", {"hot.txt": b"plugged in\n"})
    machine = await restore_with()
    missing = await error_of(
        machine, "mount", serial="kiln-nothing", mount_path="/mnt/none", read_only=False, wait=1
    )
    assert missing.code == "ENOENT"

    mount = asyncio.create_task(
        machine.agent.call(
            "mount", timeout=120, serial="kiln-hot", mount_path="/mnt/hot", read_only=False, wait=60
        )
    )
    node = {
        "driver": "raw",
        "node-name": "kiln-hot",
        "file": {"driver": "file", "filename": str(image), "locking": "off"},
    }
    await machine.qmp.execute("blockdev-add", **node)
    await machine.qmp.execute(
        "device_add", driver="scsi-hd", bus="scsi0.0", drive="kiln-hot", id="kiln-hot", serial="kiln-hot"
    )
    mounted = await mount
    assert await shell(machine, "cat /mnt/hot/hot.txt") == "plugged in\n"
    value = await machine.agent.call("umount", timeout=60, mount_path="/mnt/hot", serial="kiln-hot")
    assert value == {"unmounted": True, "deleted_device": mounted["device"]}
    await machine.qmp.execute("device_del", id="kiln-hot")


# ---- trust


SERVER = """
import http.server, ssl
class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"hello over tls"
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args): pass
server = http.server.HTTPServer(("127.0.0.1", 8443), Hello)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain("/tmp/tls/server.crt", "/tmp/tls/server.key")
server.socket = context.wrap_socket(server.socket, server_side=True)
server.serve_forever()
"""


async def test_after_trust_ca_curl_and_python_trust_a_server_it_signed(restore_with: RestoreWith) -> None:
    machine = await restore_with()
    ca = make_ca("Kiln egress CA (test)")
    server = make_server_certificate(ca, "localhost")
    for name, text in (("server.crt", server.pem), ("server.key", server.key_pem), ("server.py", SERVER)):
        await machine.agent.call(
            "write_file", path=f"/tmp/tls/{name}", mkdirs=True, data=base64.b64encode(text.encode()).decode()
        )
    await shell(machine, "setsid python3 /tmp/tls/server.py </dev/null >/tmp/tls/log 2>&1 &")
    wait = "for i in $(seq 300); do curl -sk https://localhost:8443/ >/dev/null && exit 0; sleep 0.1; done"
    wait += "; exit 1"
    assert await exit_code(machine, wait) == 0, await shell(machine, "cat /tmp/tls/log")
    # Not trusted yet: curl's certificate check fails (60).
    assert await exit_code(machine, "curl -sS https://localhost:8443/") == 60

    value = await machine.agent.call("trust_ca", timeout=30, pem=ca.pem, name="kiln-egress")
    assert value["bundle"] == "/etc/ssl/certs/ca-certificates.crt"
    await machine.agent.call("trust_ca", timeout=30, pem=ca.pem, name="kiln-egress")  # idempotent
    assert (
        await shell(machine, "grep -c 'kiln trust_ca kiln-egress: begin' /etc/ssl/certs/ca-certificates.crt")
    ).strip() == "1"
    assert await shell(machine, "curl -sS https://localhost:8443/") == "hello over tls"
    fetch = "import urllib.request; print(urllib.request.urlopen('https://localhost:8443/').read().decode())"
    assert await shell(machine, f'python3 -c "{fetch}"') == "hello over tls\n"
    environment = await shell(machine, "cat /etc/environment")
    for variable in (
        "SSL_CERT_FILE",
        "REQUESTS_CA_BUNDLE",
        "CURL_CA_BUNDLE",
        "NODE_EXTRA_CA_CERTS",
        "PIP_CERT",
    ):
        assert f'{variable}="/etc/ssl/certs/ca-certificates.crt"' in environment
    # The public CAs of the image are still there.
    assert int(await shell(machine, "grep -c 'BEGIN CERTIFICATE' /etc/ssl/certs/ca-certificates.crt")) > 100
