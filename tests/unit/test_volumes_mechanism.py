"""The pure parts of kiln.volumes, and its QMP and agent conversations
against fakes (the real ones are in tests/integration/test_volumes_*.py)."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from kiln.node.participant import HostResource, Launch, Mount, VmContext
from kiln.runtime.driver import BootImage
from kiln.runtime.errors import RuntimeFailure
from kiln.volumes import (
    GuestVolumeError,
    InvalidVolumeRequest,
    PathRefused,
    VolumeBusy,
    VolumeFileNotFound,
    attach,
    hotplug,
    images,
    tools,
)
from kiln.volumes.attachments import (
    ATTACHED,
    MOUNTED,
    PLANNED,
    Attachment,
    check_mount_path,
    drive_id_for,
)
from kiln.volumes.files import VolumeFiles, translate
from kiln.volumes.guest import ExecGuestVolumes
from kiln.volumes.layout import Layer, VolumeMeta, check_id
from kiln.volumes.locks import VolumeLocks
from kiln.volumes.participant import ATTACHMENT_KIND, LAYER_KIND, VolumeParticipant

MiB = 1024 * 1024


# ---- names and rules


def test_mount_paths_are_absolute_normal_and_not_the_systems() -> None:
    for good in ("/data", "/mnt/in", "/app/cache", "/root/x", "/tmp/v"):
        assert check_mount_path(good) == good
    for bad in (
        "data",
        "/",
        "/data/",
        "/a/../b",
        "/a/./b",
        "//data",
        "/proc",
        "/usr/local",
        "/opt/kiln/x",
        "/etc",
        "/dev/shm",
        "/a\0",
    ):
        with pytest.raises(InvalidVolumeRequest):
            check_mount_path(bad)


def test_drive_ids_are_stable_short_and_distinct() -> None:
    one = drive_id_for("vol-1", "/data", None)
    assert one == drive_id_for("vol-1", "/data", None)
    assert len(one) <= 31  # a QEMU node name; a SCSI serial allows 36
    others = {
        drive_id_for("vol-1", "/data2", None),
        drive_id_for("vol-2", "/data", None),
        drive_id_for("vol-1", "/data", "cp"),
    }
    assert one not in others and len(others) == 3


def test_ids_become_file_names_only_when_plain() -> None:
    assert check_id("vol-123_abc", "volume id") == "vol-123_abc"
    for bad in ("", "../x", "a/b", "a.b", "-x", "x" * 97):
        with pytest.raises(InvalidVolumeRequest):
            check_id(bad, "volume id")


def test_sizes_are_whole_blocks_within_bounds() -> None:
    assert images.image_size(64 * MiB + 4095, 16 * MiB, 1 << 40) == 64 * MiB
    with pytest.raises(InvalidVolumeRequest):
        images.image_size(1 * MiB, 16 * MiB, 1 << 40)
    with pytest.raises(InvalidVolumeRequest):
        images.image_size(2 << 40, 16 * MiB, 1 << 40)


def test_volume_meta_round_trips() -> None:
    meta = VolumeMeta(
        "v",
        64 * MiB,
        1.0,
        top="lt",
        layers=[Layer("l1", 2.0, "cp"), Layer("l2", 3.0, None)],
    )
    again = VolumeMeta.from_json(meta.to_json())
    assert again == meta
    assert again.checkpoint_layer("cp") == Layer("l1", 2.0, "cp")
    assert again.checkpoint_layer("gone") is None
    with pytest.raises(RuntimeFailure):
        VolumeMeta.from_json(json.dumps({**json.loads(meta.to_json()), "format": 99}))


def attachment(
    vm_id: str,
    *,
    read_only: bool,
    checkpoint: str | None = None,
    scsi_id: int = 0,
    state: str = PLANNED,
) -> Attachment:
    return Attachment(
        vm_id=vm_id, drive_id=f"vol-{vm_id}{scsi_id}", volume_id="v", mount_path=f"/m{scsi_id}",
        read_only=read_only, checkpoint_id=checkpoint, scsi_id=scsi_id, image="/x", state=state,
    )  # fmt: skip


def test_one_rw_mount_or_many_ro_mounts_of_the_live_volume() -> None:
    rw, ro = Mount("v", "/m", read_only=False), Mount("v", "/m", read_only=True)
    attach.check_exclusive([], rw)
    attach.check_exclusive([attachment("a", read_only=True)], ro)
    attach.check_exclusive(
        [attachment("a", read_only=False, checkpoint="cp")], rw
    )  # a checkpoint is not the volume
    for existing, wanted in (
        ([attachment("a", read_only=False)], rw),
        ([attachment("a", read_only=False)], ro),
        ([attachment("a", read_only=True)], rw),
    ):
        with pytest.raises(VolumeBusy):
            attach.check_exclusive(existing, wanted)


def test_drives_at_start_keep_their_scsi_targets() -> None:
    records = [
        attachment("a", read_only=False, scsi_id=1, state=MOUNTED),
        attachment("a", read_only=True, scsi_id=0, state=ATTACHED),
        attachment("a", read_only=True, scsi_id=2, state=PLANNED),
    ]
    cold = attach.drives_at_start(records, restoring=False)
    assert [d.drive_id for d in cold] == ["vol-a0", "vol-a1", "vol-a2"]
    assert [d.read_only for d in cold] == [True, False, True]
    resumed = attach.drives_at_start(
        records, restoring=True
    )  # the planned one is hot-plugged later
    assert [d.drive_id for d in resumed] == ["vol-a0", "vol-a1"]
    holes = [attachment("a", read_only=False, scsi_id=3, state=MOUNTED)]
    assert attach.drives_at_start(holes, restoring=True)[0].scsi_id == 3


def test_superblock_fields_are_read_from_dumpe2fs() -> None:
    output = (
        "Filesystem volume name:   kiln-volume\nBlock count:              262144\n"
        "Free blocks:              249189\nBlock size:               4096\n"
    )
    superblock = tools.parse_superblock(output)
    assert superblock.used_bytes == (262144 - 249189) * 4096
    with pytest.raises(RuntimeFailure):
        tools.parse_superblock("nothing useful")


def test_guest_errors_become_volume_errors() -> None:
    assert isinstance(translate(GuestVolumeError("ELOOP", "a link")), PathRefused)
    assert isinstance(translate(GuestVolumeError("EINVAL", "..")), PathRefused)
    assert isinstance(translate(GuestVolumeError("ENOENT", "gone")), VolumeFileNotFound)
    other = GuestVolumeError("EIO", "disk")
    assert translate(other) is other


async def test_the_volume_lock_lets_one_operation_in_at_a_time(tmp_path: Path) -> None:
    locks = VolumeLocks()
    order: list[str] = []
    first_in = asyncio.Event()
    release_first = asyncio.Event()

    async def first() -> None:
        async with locks.hold(tmp_path / "lock"):
            order.append("first in")
            first_in.set()
            await release_first.wait()
            order.append("first out")

    async def second() -> None:
        await first_in.wait()
        async with locks.hold(tmp_path / "lock"):
            order.append("second in")

    tasks = [asyncio.create_task(first()), asyncio.create_task(second())]
    await first_in.wait()
    await asyncio.sleep(0)
    release_first.set()
    await asyncio.gather(*tasks)
    assert order == ["first in", "first out", "second in"]


# ---- QMP, against a fake QEMU


class FakeQmp:
    """Named drives on a bus; device_del completes after a few polls, as a real unplug does."""

    def __init__(self, *, fail_device_add: bool = False) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.nodes: dict[str, dict] = {}
        self.devices: dict[str, dict] = {}
        self.unplugging: dict[str, int] = {}
        self.fail_device_add = fail_device_add

    async def execute(
        self, command: str, timeout: float = 30.0, **arguments: object
    ) -> object:
        self.calls.append((command, dict(arguments)))
        if command == "blockdev-add":
            self.nodes[str(arguments["node-name"])] = dict(arguments)
            return {}
        if command == "device_add":
            if self.fail_device_add:
                raise RuntimeFailure("device_add failed: bus full")
            self.devices[str(arguments["id"])] = dict(arguments)
            return {}
        if command == "device_del":
            self.unplugging[str(arguments["id"])] = 3
            return {}
        if command == "query-block":
            for device, polls in list(self.unplugging.items()):
                self.unplugging[device] = polls - 1
                if polls <= 1:
                    del self.devices[device], self.unplugging[device]
            return [
                {
                    "qdev": device,
                    "inserted": {
                        "node-name": self.top_of(device),
                        "file": "/f",
                        "ro": False,
                    },
                }
                for device in self.devices
            ]
        if command == "query-named-block-nodes":
            return [{"node-name": name} for name in self.nodes]
        if command == "blockdev-del":
            name = str(arguments["node-name"])
            if any(
                node.get("backing-of") == name for node in self.nodes.values()
            ) or any(self.top_of(device) == name for device in self.devices):
                raise RuntimeFailure(f"Node {name} is in use")
            self.nodes.pop(name)
            return {}
        if command == "blockdev-snapshot":
            self.nodes[str(arguments["overlay"])]["backing-of"] = arguments["node"]
            return {}
        if command == "qom-get":
            device = str(arguments["path"]).rsplit("/", 1)[1]
            return self.devices[device]["scsi-id"]
        raise AssertionError(f"unexpected QMP {command}")

    def top_of(self, device: str) -> str:
        top = str(self.devices[device]["drive"])
        while True:
            above = [
                name
                for name, node in self.nodes.items()
                if node.get("backing-of") == top
            ]
            if not above:
                return top
            top = above[0]


async def test_a_drive_is_plugged_at_its_target_and_unplugged_tops_first(
    tmp_path: Path,
) -> None:
    qmp = FakeQmp()
    await hotplug.add_drive(
        qmp, "vol-a", tmp_path / "a.qcow2", read_only=True, scsi_id=5
    )
    device = qmp.devices["vol-a"]
    assert (device["scsi-id"], device["lun"], device["serial"], device["bus"]) == (
        5,
        0,
        "vol-a",
        "scsi0.0",
    )
    assert qmp.nodes["vol-a"]["read-only"] is True
    assert await hotplug.scsi_ids_in_use(qmp) == {5}
    node = await hotplug.snapshot_drive(qmp, "vol-a", tmp_path / "b.qcow2")
    assert node == "vol-a-o001" and qmp.nodes[node]["backing"] is None
    assert (await hotplug.drives(qmp))["vol-a"].node == "vol-a-o001"
    await hotplug.remove_drive(qmp, "vol-a")
    assert qmp.nodes == {} and qmp.devices == {}
    deleted = [
        args["node-name"]
        for command, args in qmp.calls
        if command == "blockdev-del" and args["node-name"] not in qmp.nodes
    ]
    assert deleted[-1] == "vol-a"


async def test_a_failed_device_add_leaves_no_node() -> None:
    qmp = FakeQmp(fail_device_add=True)
    with pytest.raises(RuntimeFailure):
        await hotplug.add_drive(qmp, "vol-b", Path("/x"), read_only=False, scsi_id=0)
    assert qmp.nodes == {}


def test_scsi_targets_are_the_lowest_free() -> None:
    assert hotplug.free_scsi_id(set()) == 0
    assert hotplug.free_scsi_id({0, 1, 3}) == 2
    with pytest.raises(RuntimeFailure):
        hotplug.free_scsi_id(set(range(256)))


# ---- the guest tool session, against a fake agent


class FakeAgent:
    """Answers python_exec like the agent's session would, the tool loaded or not."""

    def __init__(self, answers: list[str]) -> None:
        self.answers = answers
        self.codes: list[str] = []

    async def call(self, op: str, timeout: float | None = None, **args: object) -> dict:
        raise AssertionError("not used")

    async def stream(
        self, op: str, timeout: float | None = None, **args: object
    ) -> AsyncIterator[dict]:
        assert op == "python_exec" and str(args["session"]).startswith("kiln-volumes-")
        self.codes.append(str(args["code"]))
        out = self.answers.pop(0)
        if out:
            yield {"kind": "stdout", "data": base64.b64encode(out.encode()).decode()}
        yield {"kind": "result", "value": {"exit_code": 0}}


async def test_the_tool_is_loaded_once_then_called() -> None:
    agent = FakeAgent(
        [
            '{"ok": false, "error": "ENOTLOADED", "message": ""}\n',
            "",  # the load prints nothing
            '{"ok": true, "value": {"used_bytes": 1, "total_bytes": 2, "free_bytes": 1}}\n',
        ]
    )
    usage = await ExecGuestVolumes(agent).usage("/data")
    assert (usage.used_bytes, usage.total_bytes) == (1, 2)
    assert "compile(" in agent.codes[1] and "answer(" in agent.codes[2]
    assert json.loads(
        eval(agent.codes[2].split("answer(", 1)[1].split(")\n", 1)[0])
    ) == {"op": "usage", "args": {"path": "/data"}}


async def test_a_refusal_in_the_guest_is_a_guest_volume_error() -> None:
    guest = ExecGuestVolumes(
        FakeAgent(['{"ok": false, "error": "EBUSY", "message": "busy"}\n'])
    )
    with pytest.raises(GuestVolumeError) as caught:
        await guest.umount("/data", serial="vol-x")
    assert caught.value.code == "EBUSY"
    with pytest.raises(GuestVolumeError) as silent:
        await ExecGuestVolumes(FakeAgent([""])).freeze("/data")
    assert silent.value.code == "EIO"


class ChunkAgent:
    """read_file/write_file of the agent over a dict of guest files."""

    def __init__(self) -> None:
        self.files: dict[str, bytearray] = {"/mnt/volume/f": bytearray(b"x" * 600_000)}

    async def call(self, op: str, timeout: float | None = None, **args: Any) -> dict:
        data = self.files.setdefault(args["path"], bytearray())
        if op == "read_file":
            chunk = bytes(data[args["offset"] : args["offset"] + args["length"]])
            return {
                "data": base64.b64encode(chunk).decode(),
                "eof": args["offset"] + len(chunk) >= len(data),
                "size": len(data),
            }
        assert op == "write_file" and args["truncate"] is False
        data[args["offset"] : args["offset"]] = base64.b64decode(args["data"])
        return {"size": len(data)}

    def stream(
        self, op: str, timeout: float | None = None, **args: object
    ) -> AsyncIterator[dict]:
        raise AssertionError("not used")


class ToolGuest:
    def __init__(self) -> None:
        self.ops: list[str] = []

    async def file_op(self, op: str, **args: object) -> dict:
        self.ops.append(op)
        if op == "file_open_read":
            return {"guest_path": "/mnt/volume/f", "size": 600_000}
        if op == "file_begin_write":
            return {
                "guest_path": "/mnt/volume/.kiln-upload-1",
                "temporary": ".kiln-upload-1",
            }
        if op == "file_commit_write":
            return {
                "path": args["path"],
                "size": 300_000,
                "is_dir": False,
                "kind": "file",
                "modified_at": 0.0,
            }
        raise AssertionError(op)


async def test_file_data_moves_in_agent_sized_chunks() -> None:
    agent, guest = ChunkAgent(), ToolGuest()
    files = VolumeFiles(agent, guest, "/mnt/volume")  # type: ignore[arg-type]
    assert await files.download("f") == b"x" * 600_000
    from kiln.volumes.files import BytesSource

    entry = await files.upload("g", BytesSource(b"y" * 300_000))
    assert (
        entry.size == 300_000
        and bytes(agent.files["/mnt/volume/.kiln-upload-1"]) == b"y" * 300_000
    )
    assert guest.ops == ["file_open_read", "file_begin_write", "file_commit_write"]
    with pytest.raises(RuntimeFailure):
        await files.download("f", max_bytes=10)


# ---- the participant, against a fake Volumes


class FakeLedger:
    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.rows: list[HostResource] = []

    async def record(self, *resources: HostResource) -> None:
        for resource in resources:
            self.log.append(f"record {resource.kind}")
            self.rows.append(resource)

    async def forget(self, *resources: HostResource) -> None:
        for resource in resources:
            self.log.append(f"forget {resource.kind}")
            self.rows.remove(resource)

    async def of_vm(self, vm_id: str) -> list[HostResource]:
        return [r for r in self.rows if r.vm_id == vm_id]

    async def all(self) -> list[HostResource]:
        return list(self.rows)


class FakeVolumes:
    def __init__(self, root: Path, log: list[str]) -> None:
        self.root = root
        self.log = log

    def paths(self, volume_id: str):  # type: ignore[no-untyped-def]
        from kiln.volumes.layout import VolumePaths

        return VolumePaths(self.root / volume_id)

    async def plan(self, vm_id: str, mount: Mount) -> None:
        self.log.append(f"plan {mount.mount_path}")

    def drives_at_start(self, vm_id: str, *, restoring: bool) -> list:
        self.log.append(f"drives restoring={restoring}")
        return []

    async def release(self, vm_id: str, drive_ids: set[str] | None = None) -> list:
        self.log.append(f"release {len(drive_ids or ())} drives")
        return []


async def test_the_participant_records_before_it_makes_and_forgets_after(
    tmp_path: Path,
) -> None:
    log: list[str] = []
    ledger = FakeLedger(log)
    participant = VolumeParticipant(FakeVolumes(tmp_path, log), ledger)  # type: ignore[arg-type]
    image = BootImage("default", tmp_path / "k", tmp_path / "i", tmp_path / "r", "")
    vm = VmContext(
        vm_id="vm-1", owner_id=3, vcpu_count=1, memory_mb=256, image=image, run_dir=tmp_path / "vm",
        mounts=(Mount("v1", "/data", read_only=False), Mount("v1", "/old", read_only=False, checkpoint_id="cp")),
    )  # fmt: skip
    await participant.prepare(vm, Launch(), ledger)
    assert log == [
        "record volume-attachment", "plan /data",
        "record volume-attachment", "record volume-layer", "plan /old",
        "drives restoring=False",
    ]  # fmt: skip
    assert {r.kind for r in ledger.rows} == {ATTACHMENT_KIND, LAYER_KIND}
    assert all(r.owner_id == 3 and r.vm_id == "vm-1" for r in ledger.rows)
    log.clear()
    await participant.release("vm-1", list(ledger.rows), ledger)
    # Only the drives named go (the reconciler hands over what it found stray).
    assert log[0] == "release 2 drives" and ledger.rows == []
