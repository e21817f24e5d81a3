"""The volume phase: a volume against the VM's own root disk, same VM, same run.

One VM (the bench shape) and one 1 GiB volume, all through the API: hot attach
(``POST /v1/vms/{id}/volumes?wait=true``: plug over QMP and the guest's mount)
and detach; sequential ``dd`` writes (``conv=fsync``) and reads (after the
guest dropped its page cache) on the volume and on the root disk; then
checkpoints of the volume holding data, mounted rw (the guest's filesystem
frozen meanwhile) and unmounted.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import httpx

from bench.stats import Figures

MiB = 1024 * 1024
VOLUME_BYTES = 1024 * MiB
MOUNT_PATH = "/vol"
ROOT_DIR = "/root"
# More data before each mounted checkpoint, so each one captures changes.
CHANGED_MIB = 16


def declare(figures: Figures) -> None:
    ms, rate = "ms", "MB/s"
    figures.declare("root_write_mb_s", rate, note="dd bs=1M conv=fsync onto the VM's root disk (in the guest)")
    figures.declare("volume_write_mb_s", rate, baseline="root_write_mb_s",
                    note="the same onto a mounted volume, same VM")
    figures.declare("root_read_mb_s", rate, note="dd bs=1M of that file after the guest dropped its page cache")
    figures.declare("volume_read_mb_s", rate, baseline="root_read_mb_s", note="the same on the volume")
    figures.declare("volume_checkpoint_1g_ms", ms, note="POST /v1/volumes/{id}/checkpoints of a 1 GiB volume "
                    "holding data, mounted rw in a running VM (the guest's filesystem frozen meanwhile), "
                    f"{CHANGED_MIB} MiB changed since the one before")
    figures.declare("volume_checkpoint_1g_unmounted_ms", ms, baseline="volume_checkpoint_1g_ms",
                    note="the same with the volume mounted nowhere")
    figures.declare("volume_hot_attach_ms", ms, note="POST /v1/vms/{id}/volumes?wait=true: the drive plugged "
                    "over QMP and mounted by the guest (rw)")
    figures.declare("volume_detach_ms", ms, note="DELETE /v1/vms/{id}/volumes/{volume}?wait=true: the guest "
                    "syncs and unmounts, the drive is unplugged")


def dd_rate(output: str) -> float:
    """MB/s (10^6 bytes) from dd's summary line."""
    match = re.search(r"^(\d+) bytes .* copied, ([\d.]+) s", output, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no dd figure in {output!r}")
    return int(match.group(1)) / float(match.group(2)) / 1e6


def ms_since(started: float) -> float:
    return (time.monotonic() - started) * 1000


def measure(
    figures: Figures,
    client: httpx.Client,
    create_vm: Callable[[], dict],
    *,
    samples: int,
    dd_mib: int,
    fill_mib: int,
) -> str:
    """The phase; returns the VM's id (the caller deletes it). The volume is
    deleted here, whatever happens."""

    def call(method: str, path: str, **options: object) -> dict:
        response = client.request(method, path, **options)  # type: ignore[arg-type]
        if response.status_code != 200:
            raise RuntimeError(f"{method} {path} answered {response.status_code}: {response.text[:300]}")
        return response.json()

    volume_id = call("POST", "/v1/volumes", json={"name": "bench", "quota_bytes": VOLUME_BYTES})["id"]
    vm: dict = {}
    try:
        vm = create_vm()
        vm_id, session = vm["vm_id"], vm["session_id"]

        def shell(command: str) -> str:
            result = call("POST", "/execute", json={"session_id": session, "command": command, "language": "bash"})
            if result["exit_code"] != 0:
                raise RuntimeError(f"{command!r} failed: {result['stderr'][-300:]}")
            return str(result["stdout"])

        mount = {"volume_id": volume_id, "mount_path": MOUNT_PATH}
        for _ in range(samples):
            started = time.monotonic()
            call("POST", f"/v1/vms/{vm_id}/volumes", params={"wait": "true"}, json=mount)
            figures["volume_hot_attach_ms"].add(ms_since(started))
            started = time.monotonic()
            call("DELETE", f"/v1/vms/{vm_id}/volumes/{volume_id}", params={"mount_path": MOUNT_PATH, "wait": "true"})
            figures["volume_detach_ms"].add(ms_since(started))

        call("POST", f"/v1/vms/{vm_id}/volumes", params={"wait": "true"}, json=mount)
        for _ in range(samples):
            for directory, kind in ((MOUNT_PATH, "volume"), (ROOT_DIR, "root")):
                path = f"{directory}/bench.bin"
                written = shell(f"dd if=/dev/zero of={path} bs=1M count={dd_mib} conv=fsync 2>&1")
                figures[f"{kind}_write_mb_s"].add(dd_rate(written))
                shell("sync; echo 3 > /proc/sys/vm/drop_caches")
                figures[f"{kind}_read_mb_s"].add(dd_rate(shell(f"dd if={path} of=/dev/null bs=1M 2>&1")))
                shell(f"rm -f {path}; sync")

        shell(f"head -c {fill_mib * MiB} /dev/urandom > {MOUNT_PATH}/fill && sync")
        checkpoints = f"/v1/volumes/{volume_id}/checkpoints"
        for index in range(samples):
            shell(f"dd if=/dev/urandom of={MOUNT_PATH}/fill bs=1M count={CHANGED_MIB} "
                  f"seek={index * CHANGED_MIB} conv=notrunc,fsync 2>&1")  # fmt: skip
            started = time.monotonic()
            call("POST", checkpoints, json={"name": f"mounted-{index}"})
            figures["volume_checkpoint_1g_ms"].add(ms_since(started))
        call("DELETE", f"/v1/vms/{vm_id}/volumes/{volume_id}", params={"mount_path": MOUNT_PATH})
        for index in range(samples):
            started = time.monotonic()
            call("POST", checkpoints, json={"name": f"unmounted-{index}"})
            figures["volume_checkpoint_1g_unmounted_ms"].add(ms_since(started))
    finally:
        if vm:
            # The volume can only go once nothing mounts it.
            client.delete(f"/v1/vms/{vm['vm_id']}/volumes/{volume_id}", params={"mount_path": MOUNT_PATH})
        client.delete(f"/v1/volumes/{volume_id}")
    return str(vm["vm_id"])
