"""mount, umount, fsfreeze, fsthaw and disk_usage on this host: a real ext4 on
a loop device, mounted in a mount namespace of the agent's own.

What a guest's sysfs says about a SCSI disk is faked (a scratch ``--sys-dir``
with the disk's VPD serial page and its ``delete`` file, and a ``--dev-dir``
whose ``sdz`` leads to the loop device); the filesystem, the mount table, the
e2fsck, the freezes and the processes holding a mount are all real. The real
SCSI path is tested in a VM (tests/integration/test_guest_ops.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import pytest
from unit.agent_process import (
    AgentConnection,
    host_busybox,
    require,
    require_root_namespaces,
    running_agent,
)

SERIAL = "kiln-vol-test1"
NAMESPACE_PREFIX = ("unshare", "--mount", "--propagation", "private")


@dataclass
class Volume:
    image: Path
    loop: str
    sys_dir: Path
    dev_dir: Path
    mount_path: Path

    @property
    def delete_request(self) -> Path:
        return self.sys_dir / "block" / "sdz" / "device" / "delete"


def make_image(path: Path, files: dict[str, bytes]) -> None:
    tree = path.with_suffix(".tree")
    tree.mkdir()
    for name, data in files.items():
        (tree / name).write_bytes(data)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "vol", "-d", str(tree), str(path), "32M"], check=True)


def fake_scsi_disk(root: Path, serial: str, loop: str) -> tuple[Path, Path]:
    """A sysfs with one SCSI disk sdz of ``serial``, and a /dev where sdz is ``loop``."""
    disk = root / "sys" / "block" / "sdz"
    (disk / "device").mkdir(parents=True)
    encoded = serial.encode()
    (disk / "device" / "vpd_pg80").write_bytes(bytes([0, 0x80, 0, len(encoded)]) + encoded)
    (disk / "device" / "delete").write_text("")
    (disk / "ro").write_text("0\n")
    (root / "sys" / "class" / "scsi_host" / "host0").mkdir(parents=True)
    (root / "sys" / "class" / "scsi_host" / "host0" / "scan").write_text("")
    (root / "dev").mkdir()
    (root / "dev" / "sdz").symlink_to(loop)
    return root / "sys", root / "dev"


@pytest.fixture
def volume_factory(tmp_path: Path) -> Iterator[Callable[..., Volume]]:
    require_root_namespaces()
    for tool in ("losetup", "mkfs.ext4", "e2fsck", "debugfs"):
        require(shutil.which(tool) is not None, f"needs {tool}")
    loops: list[str] = []

    def make(files: dict[str, bytes] | None = None, corrupt: bool = False) -> Volume:
        image = tmp_path / "volume.ext4"
        make_image(image, files or {"hello.txt": b"hello from the host\n"})
        if corrupt:
            # A wrong free-blocks count on a filesystem marked not clean:
            # e2fsck -p repairs it (exit 1).
            for request in ("ssv free_blocks_count 17", "ssv state 0"):
                subprocess.run(["debugfs", "-w", "-R", request, str(image)], check=True, capture_output=True)
        loop = subprocess.run(
            ["losetup", "-f", "--show", str(image)], check=True, capture_output=True, text=True
        ).stdout.strip()
        loops.append(loop)
        sys_dir, dev_dir = fake_scsi_disk(tmp_path / "fake", SERIAL, loop)
        return Volume(image, loop, sys_dir, dev_dir, tmp_path / "mnt" / "data")

    yield make
    for loop in loops:
        subprocess.run(["losetup", "-d", loop], check=False)


@pytest.fixture
def volume(volume_factory: Callable[..., Volume]) -> Volume:
    return volume_factory()


def agent_for(volume: Volume, tmp_path: Path) -> AbstractContextManager[AgentConnection]:
    return running_agent(
        "--etc-dir",
        str(tmp_path),
        "--workdir",
        str(tmp_path),
        "--busybox",
        host_busybox(),
        "--sys-dir",
        str(volume.sys_dir),
        "--dev-dir",
        str(volume.dev_dir),
        prefix=NAMESPACE_PREFIX,
    )


def shell(agent: AgentConnection, command: str) -> tuple[int, str]:
    out, err, result = agent.run(shell=command, timeout=30)
    return result["exit_code"], (out + err).decode()


def test_mount_write_umount_and_the_disk_is_deleted(volume: Volume, tmp_path: Path) -> None:
    with agent_for(volume, tmp_path) as agent:
        mounted = agent.call(
            "mount", serial=SERIAL, mount_path=str(volume.mount_path), read_only=False, fsck=True
        )
        assert mounted["device"] == str(volume.dev_dir / "sdz")
        assert mounted["mount_path"] == str(volume.mount_path) and mounted["already_mounted"] is False
        assert mounted["fsck"]["mode"] == "preen" and mounted["fsck"]["exit_code"] == 0
        assert shell(agent, f"cat {volume.mount_path}/hello.txt") == (0, "hello from the host\n")
        options = shell(agent, f"grep ' {volume.mount_path} ' /proc/self/mountinfo")[1]
        assert all(option in options for option in ("rw", "nosuid", "nodev"))
        assert shell(agent, f"echo written in the guest > {volume.mount_path}/new.txt")[0] == 0

        usage = agent.call("disk_usage", path=str(volume.mount_path))
        assert 20 * 2**20 < usage["total_bytes"] <= 32 * 2**20  # less what ext4 keeps for itself
        assert (
            0 < usage["used_bytes"] < usage["total_bytes"] and 0 < usage["free_bytes"] < usage["total_bytes"]
        )

        assert volume.delete_request.read_text() == ""
        value = agent.call("umount", mount_path=str(volume.mount_path), serial=SERIAL)
        assert value == {"unmounted": True, "deleted_device": str(volume.dev_dir / "sdz")}
        assert volume.delete_request.read_text() == "1\n"
        assert shell(agent, f"grep -c ' {volume.mount_path} ' /proc/self/mountinfo")[1].strip() == "0"
        # Unmounting again is not an error: the host may retry.
        assert agent.call("umount", mount_path=str(volume.mount_path))["unmounted"] is False
    subprocess.run(["losetup", "-d", volume.loop], check=True)
    written = subprocess.run(
        ["debugfs", "-R", "cat /new.txt", str(volume.image)], capture_output=True, text=True, check=False
    )
    assert written.stdout == "written in the guest\n"


def test_read_only_mounts_refuse_writes_and_a_busy_path_or_disk_is_ebusy(
    volume: Volume, tmp_path: Path
) -> None:
    with agent_for(volume, tmp_path) as agent:
        agent.call("mount", serial=SERIAL, mount_path=str(volume.mount_path), read_only=True)
        options = shell(agent, f"grep ' {volume.mount_path} ' /proc/self/mountinfo")[1].split()[5]
        assert options.split(",")[0] == "ro"
        code, output = shell(agent, f"touch {volume.mount_path}/nope")
        assert code != 0 and "Read-only" in output
        # The same disk at the same path the same way: a success, nothing done.
        again = agent.call("mount", serial=SERIAL, mount_path=str(volume.mount_path), read_only=True)
        assert again["already_mounted"] is True
        assert (
            agent.error("mount", serial=SERIAL, mount_path=str(volume.mount_path), read_only=False) == "EBUSY"
        )
        assert (
            agent.error("mount", serial=SERIAL, mount_path=str(tmp_path / "elsewhere"), read_only=True)
            == "EBUSY"
        )
        assert agent.call("umount", mount_path=str(volume.mount_path))["unmounted"] is True


def test_a_held_mount_is_ebusy_naming_the_holder_and_force_kills_it(volume: Volume, tmp_path: Path) -> None:
    with agent_for(volume, tmp_path) as agent:
        agent.call("mount", serial=SERIAL, mount_path=str(volume.mount_path), read_only=False)
        pid_file = tmp_path / "holder.pid"
        code, _ = shell(
            agent,
            f"cd {volume.mount_path} && setsid sh -c 'echo $$ > {pid_file}; exec sleep 300' "
            "</dev/null >/dev/null 2>&1 &",
        )
        assert code == 0
        while not pid_file.exists() or not pid_file.read_text().strip():
            time.sleep(0.01)  # the holder writes its pid as it starts
        holder = int(pid_file.read_text())
        while os.readlink(f"/proc/{holder}/exe").split("/")[-1] != "sleep":
            time.sleep(0.01)  # until it has exec'd sleep
        _, final = agent.wait(agent.start("umount", mount_path=str(volume.mount_path), serial=SERIAL))
        assert final["error"] == "EBUSY" and f"pid {holder} (sleep)" in final["message"], final
        assert volume.delete_request.read_text() == "", "a disk still mounted is never deleted"

        value = agent.call("umount", mount_path=str(volume.mount_path), serial=SERIAL, force=True)
        assert value["unmounted"] is True and value["deleted_device"]
        assert holder_gone_or_zombie(holder)


def holder_gone_or_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def test_fsck_repairs_what_it_safely_can_and_says_so(
    volume_factory: Callable[..., Volume], tmp_path: Path
) -> None:
    volume = volume_factory(corrupt=True)
    with agent_for(volume, tmp_path) as agent:
        mounted = agent.call(
            "mount", serial=SERIAL, mount_path=str(volume.mount_path), read_only=False, fsck=True
        )
        assert mounted["fsck"]["repaired"] is True and mounted["fsck"]["exit_code"] & 1, mounted["fsck"]
        assert mounted["fsck"]["errors_left"] is False
        assert shell(agent, f"cat {volume.mount_path}/hello.txt")[1] == "hello from the host\n"
        agent.call("umount", mount_path=str(volume.mount_path))
    subprocess.run(["losetup", "-d", volume.loop], check=True)
    check = subprocess.run(["e2fsck", "-fn", str(volume.image)], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout


def test_freeze_and_thaw_are_the_kernels_and_a_frozen_mount_is_not_unmounted(
    volume: Volume, tmp_path: Path
) -> None:
    with agent_for(volume, tmp_path) as agent:
        path = str(volume.mount_path)
        agent.call("mount", serial=SERIAL, mount_path=path, read_only=False)
        assert agent.call("fsfreeze", mount_path=path) == {"already_frozen": False}
        # The kernel answers EBUSY to a second freeze: it is frozen.
        assert agent.call("fsfreeze", mount_path=path) == {"already_frozen": True}
        assert agent.error("umount", mount_path=path) == "EBUSY"
        writer = agent.start("exec", shell=f"echo after the thaw > {path}/late.txt")
        assert agent.call("fsthaw", mount_path=path) == {"thawed": True, "auto_thawed": False}
        _, final = agent.wait(writer)
        assert final["value"]["exit_code"] == 0
        assert agent.call("fsthaw", mount_path=path) == {"thawed": False, "auto_thawed": False}
        assert agent.error("fsfreeze", mount_path="/") == "EINVAL"
        assert agent.error("fsfreeze", mount_path=str(tmp_path)) == "EINVAL"  # not a mount point
        agent.call("umount", mount_path=path)


def test_a_freeze_the_host_forgets_is_thawed_by_the_agent(volume: Volume, tmp_path: Path) -> None:
    with agent_for(volume, tmp_path) as agent:
        path = str(volume.mount_path)
        agent.call("mount", serial=SERIAL, mount_path=path, read_only=False)
        agent.call("fsfreeze", mount_path=path, thaw_after=0.5)
        # Blocks while frozen: it finishes only once the agent has thawed it.
        assert shell(agent, f"echo x > {path}/after-auto-thaw")[0] == 0
        assert agent.call("fsthaw", mount_path=path) == {"thawed": False, "auto_thawed": True}
        agent.call("umount", mount_path=path)


def test_waiting_for_a_disk_is_bounded_and_rescans_the_bus(volume: Volume, tmp_path: Path) -> None:
    with agent_for(volume, tmp_path) as agent:
        _, final = agent.wait(
            agent.start(
                "mount", serial="no-such-disk", mount_path=str(volume.mount_path), read_only=False, wait=0.3
            )
        )
        assert final["error"] == "ENOENT" and "no-such-disk" in final["message"]
        assert (volume.sys_dir / "class" / "scsi_host" / "host0" / "scan").read_text() == "- - -\n"
        assert agent.error("mount", serial=SERIAL, mount_path="/proc/x", read_only=False) == "EINVAL"
        assert agent.error("mount", serial=SERIAL, mount_path="relative", read_only=False) == "EINVAL"
        assert agent.error("mount", serial="a/b", mount_path=str(volume.mount_path)) == "EINVAL"
        assert agent.error("mount", serial=SERIAL, mount_path=str(volume.mount_path), timeout=-1) == "EINVAL"
        assert not volume.mount_path.exists()


def test_without_a_mount_namespace_of_its_own_the_host_mounts_are_refused(tmp_path: Path) -> None:
    with running_agent("--etc-dir", str(tmp_path)) as agent:
        for op, args in (
            ("mount", {"serial": SERIAL, "mount_path": str(tmp_path / "m")}),
            ("umount", {"mount_path": str(tmp_path / "m")}),
            ("fsfreeze", {"mount_path": "/tmp"}),
            ("fsthaw", {"mount_path": "/tmp"}),
        ):
            assert agent.error(op, **args) in ("EACCES", "EINVAL"), op
        assert agent.error("mount", serial=SERIAL, mount_path=str(tmp_path / "m")) == "EACCES"
        # disk_usage only reads: it works anywhere.
        assert agent.call("disk_usage", path=str(tmp_path))["total_bytes"] > 0
