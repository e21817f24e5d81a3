"""Snapshot figures of the QEMU runtime: cold boot vs restore, save, pool claim, memory.

``python -m bench.snapshots [--samples N] [--json FILE]`` from the checkout. It
uses the built ``default`` image and its cached base snapshot (made once if
missing), runs every VM in a temporary data dir, destroys them all, and prints
medians (and min/max) of N samples per figure.

- cold boot: ``Hypervisor.start`` + ``wait_ready`` from kernel and initramfs.
- restore: the same from the base snapshot (QEMU start, load, agent ready),
  then ``post_restore`` (entropy, clock, hostname) as the VM service does.
- save (keeps running): ``Hypervisor.save`` of a restored VM, which continues.
- save (stops): ``Hypervisor.save(keep_running=False)``, as suspend does.
- pool claim: ``WarmPool.claim`` + ``Node.claim`` (the clock; identity was set at fill) of an idle pool VM.
- RSS/PSS: of each of three restored VMs, after a short exec in each.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from kiln.config import Settings
from kiln.node.host import build_node
from kiln.node.ledger import MemoryLedger
from kiln.node.participant import VmContext
from kiln.node.pool import PoolSource, WarmPool
from kiln.runtime.driver import BootImage, MachineSpec, SavedState
from kiln.runtime.images import ImageStore
from kiln.runtime.qemu import QemuHypervisor, QemuMachine
from kiln.runtime.snapshots import BaseSnapshots, Shape, reset_identity

SHAPE = Shape(memory_mb=256, vcpu_count=1)


def memory_use_kb(pid: int) -> tuple[int, int]:
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("Rss", "Pss"):
            values[name] = int(rest.split()[0])
    return values["Rss"], values["Pss"]


def summary(samples: list[float]) -> dict:
    return {
        "median": round(statistics.median(samples), 3),
        "min": round(min(samples), 3),
        "max": round(max(samples), 3),
        "n": len(samples),
    }


async def measure(samples: int) -> dict:
    data_dir = Path(tempfile.mkdtemp(prefix="kiln-bs-"))
    settings = Settings(data_dir=data_dir)
    hypervisor = QemuHypervisor(settings)
    image = ImageStore(settings).get("default")
    if image is None:
        raise SystemExit("build the default image first: kiln images build default")
    started_ids: list[str] = []

    async def start(restore_from: SavedState | None) -> QemuMachine:
        vm_id = f"b{uuid.uuid4().hex[:8]}"
        started_ids.append(vm_id)
        machine = await hypervisor.start(
            MachineSpec(vm_id, SHAPE.vcpu_count, SHAPE.memory_mb, image,
                        settings.vms_dir / vm_id, restore_from=restore_from)
        )  # fmt: skip
        await machine.wait_ready(settings.boot_timeout_seconds)
        if restore_from is not None:
            await reset_identity(machine, vm_id)
        return machine

    async def timed(work: Awaitable[object]) -> float:
        began = time.monotonic()
        await work
        return time.monotonic() - began

    figures: dict = {}
    try:
        base = await BaseSnapshots(settings, hypervisor).ensure(image, SHAPE)
        cold, restore, save_running, save_stopping = [], [], [], []
        for _ in range(samples):
            began = time.monotonic()
            machine = await start(None)
            cold.append(time.monotonic() - began)
            await hypervisor.destroy(machine.vm_id, machine.run_dir)
        for index in range(samples):
            began = time.monotonic()
            machine = await start(base)
            restore.append(time.monotonic() - began)
            await machine.agent.call("exec", shell="echo warm > /root/f", timeout=10)
            save_running.append(
                await timed(hypervisor.save(machine, data_dir / "saves" / f"r{index}"))
            )
            save_stopping.append(
                await timed(hypervisor.save(machine, data_dir / "saves" / f"s{index}", keep_running=False))
            )  # fmt: skip
            await hypervisor.destroy(machine.vm_id, machine.run_dir)
        figures["cold_boot_to_ready_s"] = summary(cold)
        figures["restore_to_ready_with_identity_s"] = summary(restore)
        figures["save_keep_running_s"] = summary(save_running)
        figures["save_and_stop_s"] = summary(save_stopping)

        node = build_node(settings, hypervisor, MemoryLedger())
        pool = WarmPool(node, settings.vms_dir, 1, _constant_source(image, base), _pool_id(started_ids))
        claims = []
        for _ in range(samples):
            await pool.fill()
            began = time.monotonic()
            claimed = pool.claim(base)
            assert claimed is not None
            await node.claim(
                VmContext(claimed.vm_id, 1, SHAPE.vcpu_count, SHAPE.memory_mb, image, claimed.run_dir, base),
                claimed,
            )
            claims.append(time.monotonic() - began)
            await node.stop(claimed.vm_id)
        await pool.stop()
        figures["pool_claim_s"] = summary(claims)

        trio = [await start(base) for _ in range(3)]
        for machine in trio:
            await machine.agent.call("exec", shell="true", timeout=10)
        figures["restored_vm_memory_kb"] = [
            dict(zip(("rss", "pss"), memory_use_kb(machine.pid), strict=True)) for machine in trio
        ]
        cold_machine = await start(None)
        await cold_machine.agent.call("exec", shell="true", timeout=10)
        figures["cold_booted_vm_memory_kb"] = dict(
            zip(("rss", "pss"), memory_use_kb(cold_machine.pid), strict=True)
        )
    finally:
        for vm_id in started_ids:
            await hypervisor.destroy(vm_id, settings.vms_dir / vm_id)
        shutil.rmtree(data_dir, ignore_errors=True)
    return figures


def _constant_source(image: BootImage, saved: SavedState) -> PoolSource:
    async def source() -> tuple[BootImage, SavedState] | None:
        return image, saved

    return source


def _pool_id(started_ids: list[str]) -> Callable[[], str]:
    def new_id() -> str:
        vm_id = f"p{uuid.uuid4().hex[:8]}"
        started_ids.append(vm_id)
        return vm_id

    return new_id


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.snapshots", description=__doc__)
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--json", type=Path)
    arguments = parser.parse_args()
    figures = asyncio.run(measure(arguments.samples))
    for name, value in figures.items():
        print(f"{name:36} {value}")
    if arguments.json:
        arguments.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
