"""Volume figures, measured with real VMs: ``python -m kiln.volumes.bench [--json FILE]``.

- sequential write and read MB/s in the guest on a volume and on the VM's
  root disk, in the same VM and run (``dd`` with ``conv=fsync``; the read
  after dropping the guest's page cache);
- the time of a checkpoint of a 1 GiB volume holding 512 MiB, mounted rw (the
  guest frozen meanwhile) and unmounted;
- the time of a hot attach (QMP plug, and plug + guest mount) and a detach.

A tool, not part of the mechanism: it starts VMs with the runtime's QEMU
driver and the default image's base snapshot (made if missing), in a temp
data dir it removes. The host is shared: the JSON states the load average at
start and end. ``kiln bench`` can call ``measure`` once it has a volumes phase.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from kiln.config import Settings
from kiln.node.participant import Mount
from kiln.volumes import hotplug
from kiln.volumes.attachments import drive_id_for
from kiln.volumes.volumes import Volumes

MiB = 1024 * 1024
DD_MIB = 256
SAMPLES = 3


async def shell(machine: Any, command: str, timeout: float = 600) -> str:
    out = bytearray()
    err = bytearray()
    async for frame in machine.agent.stream("exec", shell=command, timeout=timeout):
        if frame["kind"] == "stdout":
            out += base64.b64decode(frame["data"])
        elif frame["kind"] == "stderr":
            err += base64.b64decode(frame["data"])
        elif frame["kind"] == "result" and frame["value"]["exit_code"] != 0:
            raise RuntimeError(f"{command!r} failed: {err.decode(errors='replace')}")
    return (out + err).decode(errors="replace")


def dd_rate(output: str) -> float:
    """MB/s (10^6) from dd's last line: '<bytes> bytes (...) copied, <seconds> s, ...'."""
    match = re.search(r"^(\d+) bytes .* copied, ([\d.]+) s", output, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no dd figure in {output!r}")
    return int(match.group(1)) / float(match.group(2)) / 1e6


async def sequential(machine: Any, directory: str) -> tuple[float, float]:
    path = f"{directory}/bench.bin"
    write = dd_rate(
        await shell(
            machine, f"dd if=/dev/zero of={path} bs=1M count={DD_MIB} conv=fsync 2>&1"
        )
    )
    await shell(machine, "sync; echo 3 > /proc/sys/vm/drop_caches")
    read = dd_rate(await shell(machine, f"dd if={path} of=/dev/null bs=1M 2>&1"))
    await shell(machine, f"rm -f {path}; sync")
    return write, read


def median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


async def measure(
    settings: Settings, hypervisor: Any, image: Any, base: Any
) -> dict[str, Any]:
    from kiln.runtime.driver import (
        MachineSpec,
    )  # the runtime starts the VMs; the mechanism never does

    machines: dict[str, Any] = {}
    volumes = Volumes(settings, machines=machines.get)
    vm_id = f"bench-{os.urandom(4).hex()}"
    figures: dict[str, Any] = {"load_start": os.getloadavg()}
    try:
        machine = await hypervisor.start(
            MachineSpec(
                vm_id=vm_id,
                vcpu_count=base.vcpu_count,
                memory_mb=base.memory_mb,
                image=image,
                run_dir=settings.vms_dir / vm_id,
                restore_from=base,
            )
        )
        await machine.wait_ready(60)
        machines[vm_id] = machine
        await volumes.create("bench-vol", 1024 * MiB)
        mount = Mount("bench-vol", "/vol", read_only=False)

        plug, attach, detach = [], [], []
        for _ in range(SAMPLES):
            started = time.monotonic()
            await volumes.attach(machine, mount)
            attach.append(time.monotonic() - started)
            started = time.monotonic()
            await volumes.detach(machine, "bench-vol", "/vol")
            detach.append(time.monotonic() - started)
        drive = drive_id_for("bench-vol", "/bench-raw", None)
        layer = next(volumes.paths("bench-vol").layers.glob("*.qcow2"))
        for _ in range(SAMPLES):
            started = time.monotonic()
            await hotplug.add_drive(
                machine.qmp, drive, layer, read_only=True, scsi_id=9
            )
            plug.append(time.monotonic() - started)
            await hotplug.remove_drive(machine.qmp, drive)
        figures["hot_attach_qmp_ms"] = median(plug) * 1000
        figures["hot_attach_and_mount_ms"] = median(attach) * 1000
        figures["detach_ms"] = median(detach) * 1000

        await volumes.attach(machine, mount)
        volume_rates = [await sequential(machine, "/vol") for _ in range(SAMPLES)]
        root_rates = [await sequential(machine, "/root") for _ in range(SAMPLES)]
        figures["volume_write_mb_s"] = median([w for w, _ in volume_rates])
        figures["volume_read_mb_s"] = median([r for _, r in volume_rates])
        figures["root_write_mb_s"] = median([w for w, _ in root_rates])
        figures["root_read_mb_s"] = median([r for _, r in root_rates])

        await shell(machine, "head -c 536870912 /dev/urandom > /vol/fill && sync")
        online = []
        for index in range(SAMPLES):
            await shell(
                machine,
                f"dd if=/dev/urandom of=/vol/fill bs=1M count=16 seek={index * 16} conv=notrunc,fsync 2>&1",
            )
            started = time.monotonic()
            await volumes.create_checkpoint("bench-vol", f"online{index}")
            online.append(time.monotonic() - started)
        await volumes.detach(machine, "bench-vol", "/vol")
        offline = []
        for index in range(SAMPLES):
            started = time.monotonic()
            await volumes.create_checkpoint("bench-vol", f"offline{index}")
            offline.append(time.monotonic() - started)
        figures["checkpoint_1g_mounted_ms"] = median(online) * 1000
        figures["checkpoint_1g_unmounted_ms"] = median(offline) * 1000
        info = await volumes.get("bench-vol")
        figures["checkpoint_sizes_mb"] = [
            round(c.size_bytes / MiB, 1) for c in info.checkpoints
        ]
    finally:
        await hypervisor.destroy(vm_id, settings.vms_dir / vm_id)
        await volumes.release(vm_id)
    figures["load_end"] = os.getloadavg()
    return figures


async def main(json_file: Path | None) -> None:
    from kiln.runtime.images import ImageStore
    from kiln.runtime.qemu import QemuHypervisor
    from kiln.runtime.snapshots import BaseSnapshots, Shape

    data_dir = Path(tempfile.mkdtemp(prefix="kiln-volbench-"))
    try:
        settings = Settings(data_dir=data_dir)
        hypervisor = QemuHypervisor(settings)
        image = ImageStore(settings).get("default")
        if image is None:
            raise SystemExit("build the default image first: kiln images build default")
        # QemuHypervisor's methods take a QemuMachine, which mypy will not match
        # with the Hypervisor protocol (the runtime's typing, as in bench/).
        base = await BaseSnapshots(settings, hypervisor).ensure(image, Shape(256, 1))
        figures = await measure(settings, hypervisor, image, base)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    text = json.dumps(figures, indent=2)
    print(text)
    if json_file is not None:
        json_file.write_text(text + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None)
    asyncio.run(main(parser.parse_args().json))
