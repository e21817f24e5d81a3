"""The benchmark run: every figure of CONTRACT.md, measured in one run next to
its baseline, printed as a table and written as JSON.

Order of a run (each phase cleans up its own VMs, so later phases are not
measured next to leftovers):

1. prep: find the built image, decide the accelerator (the server gets the
   answer, so it does not probe KVM again), make sure the base snapshot of the
   bench shape is cached (untimed; normally it already is).
2. raw: restore that base snapshot with QEMU driven by hand (``bench.raw``),
   exec through a minimal agent client; a cold boot by hand.
3. kiln server (pool off): cold creates, creates from the base snapshot, exec,
   a VM with 256 MB of touched memory saved and restored, concurrent creates,
   listing, idle density.
4. raw again: restore of the touched VM's snapshot by hand (its baseline).
5. kiln server with a warm pool (KILN_POOL_SIZE), when kiln has a pool.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import shutil
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from bench import browser, egress, host, raw, shares, ssh, volumes
from bench.server import KilnServer, bench_settings, create_user_and_key, link_cache, link_image, remove_networking
from bench.stats import Figure, Figures
from kiln.config import Settings
from kiln.runtime.driver import BootImage, SavedState

REPO = Path(__file__).resolve().parent.parent
SHAPE_MEMORY_MB = 256
SHAPE_VCPUS = 1
# Every bench VM lives this long at most: long enough for the slowest phase,
# short enough that a bench killed with SIGKILL does not leave VMs for days.
VM_LIFETIME_SECONDS = 1800
# The VM whose memory is touched: 256 MB of data must fit next to the guest's own.
TOUCHED_VM_MEMORY_MB = 512
TOUCHED_MB = 256
# Shapes of the cold creates: each must have no base snapshot yet (a create of
# a shape that has one restores it). The first is the touched VM's shape, so the
# base snapshot kiln makes after that cold create serves the touched VM.
COLD_SHAPES_MB = (TOUCHED_VM_MEMORY_MB, 448, 384, 320, 288)
BASE_BUILD_TIMEOUT_SECONDS = 180.0
CONCURRENT_CREATES = 10
POOL_SETTLE_SECONDS = 1.5
LIST_RECORDS = 50
BASH_COMMAND = "echo ok"
PYTHON_COMMAND = "print('ok')"

err = Console(stderr=True)


@dataclass(frozen=True)
class Plan:
    """How many samples each figure gets."""

    mode: str
    raw_restores: int
    raw_cold_boots: int
    exec_samples: int
    creates: int
    cold_creates: int
    saves: int
    concurrent_rounds: int
    density_max_vms: int
    density_exec_samples: int
    idle_settle_seconds: float
    cpu_window_seconds: float
    list_seconds: float
    pool_size: int
    pool_creates: int


QUICK = Plan(
    mode="quick",
    raw_restores=3,
    raw_cold_boots=1,
    exec_samples=10,
    creates=3,
    cold_creates=1,
    saves=1,
    concurrent_rounds=1,
    density_max_vms=4,
    density_exec_samples=8,
    idle_settle_seconds=2.0,
    cpu_window_seconds=2.0,
    list_seconds=2.0,
    pool_size=2,
    pool_creates=3,
)
FULL = Plan(
    mode="full",
    raw_restores=10,
    raw_cold_boots=3,
    exec_samples=50,
    creates=10,
    cold_creates=3,
    saves=3,
    concurrent_rounds=3,
    density_max_vms=160,
    density_exec_samples=40,
    idle_settle_seconds=10.0,
    cpu_window_seconds=10.0,
    list_seconds=10.0,
    pool_size=4,
    pool_creates=10,
)


def declare_figures() -> Figures:
    figures = Figures()
    ms = "ms"
    figures.declare("raw_restore_ms", ms, note="QEMU driven by hand: overlay, spawn with -incoming defer, "
                    "load the base snapshot over QMP, agent ping, post_restore")
    figures.declare("raw_claim_ms", ms, note="set_clock of a VM restored by hand, given its identity "
                    "(post_restore) and then idle for a while, as in a warm pool: the floor of a pool create")
    figures.declare("raw_cold_boot_ms", ms, note="QEMU driven by hand: overlay, kernel boot, agent ping")
    figures.declare("create_cold_ms", ms, baseline="raw_cold_boot_ms",
                    note="POST /v1/vms?wait=true of a shape with no base snapshot; kiln boots it cold and "
                    "at the same time starts making that shape's base snapshot in the background")
    figures.declare("create_snapshot_ms", ms, baseline="raw_restore_ms", target="<= 1.5x baseline",
                    note="POST /v1/vms?wait=true restored from the base snapshot (256 MB, 1 vCPU)")
    figures.declare("create_pool_ms", ms, baseline="raw_claim_ms", target="< 50 ms",
                    note="POST /v1/vms?wait=true claimed from the warm pool")
    figures.declare("exec_pool_first_ms", ms, baseline="exec_bash_ms", target="<= 2x baseline",
                    note=f"the first POST /execute bash '{BASH_COMMAND}' in a VM claimed from the warm pool "
                    "(pool VMs run bash and python3 once when made: kiln.node.pool)")
    figures.declare("delete_ms", ms, note="DELETE /v1/vms/{id} of a running VM")
    figures.declare("exec_raw_agent_ms", ms, note=f"agent exec bash -c '{BASH_COMMAND}' over the agent "
                    "socket with a minimal frame client")
    figures.declare("exec_raw_agent_python_ms", ms, note=f"agent python_exec {PYTHON_COMMAND} "
                    "(warm interpreter) with a minimal frame client")
    figures.declare("exec_bash_ms", ms, baseline="exec_raw_agent_ms", target="< 10 ms and <= baseline + 5 ms",
                    note=f"POST /execute language=bash '{BASH_COMMAND}'")
    figures.declare("exec_python_ms", ms, baseline="exec_raw_agent_python_ms",
                    target="< 10 ms and <= baseline + 5 ms",
                    note=f"POST /execute language=python {PYTHON_COMMAND} (warm session)")
    figures.declare("exec_python_first_ms", ms, note="the first POST /execute python of a session "
                    "(starts the guest interpreter)")
    figures.declare("snapshot_save_ms", ms, note=f"POST /v1/vms/{{id}}/snapshot?wait=true of a "
                    f"{TOUCHED_VM_MEMORY_MB} MB VM with {TOUCHED_MB} MB of touched memory")
    figures.declare("snapshot_size_mb", "MB", note="size of that snapshot on disk")
    figures.declare("raw_restore_touched_ms", ms, note=f"the {TOUCHED_MB} MB-touched snapshot restored "
                    "by hand (as raw_restore_ms)")
    figures.declare("restore_touched_ms", ms, baseline="raw_restore_touched_ms",
                    note=f"POST /v1/vms?wait=true with snapshot_id of the {TOUCHED_MB} MB-touched snapshot")
    figures.declare("concurrent_creates_per_s", "VMs/s",
                    note=f"{CONCURRENT_CREATES} POST /v1/vms?wait=true at once; successes / wall time")
    figures.declare("concurrent_create_ms", ms, baseline="create_snapshot_ms",
                    note="latency of each of those creates")
    figures.declare("concurrent_create_failures", "count", target="0",
                    note="creates of those that did not answer 200 with status running")
    figures.declare("density_idle_vms", "VMs", target=">= 150",
                    note="idle VMs started one after another until the admission limit or the cap")
    figures.declare("density_create_ms", ms, baseline="create_snapshot_ms",
                    note="each create while filling the host")
    figures.declare("density_rss_mb_per_vm", "MB", note="RSS of each idle VM's QEMU")
    figures.declare("density_pss_mb_per_vm", "MB", note="PSS of each idle VM's QEMU "
                    "(shared base-snapshot pages divided among the VMs)")
    figures.declare("density_cpu_pct_per_vm", "% of a core", note="CPU of each idle VM's QEMU")
    figures.declare("density_exec_ms", ms, baseline="exec_bash_ms", target="< 50 ms",
                    note=f"POST /execute bash '{BASH_COMMAND}', round robin over the idle VMs, each "
                    "after its first exec (as exec_bash_ms)")
    figures.declare("density_exec_first_ms", ms, baseline="exec_bash_ms",
                    note=f"the first POST /execute bash '{BASH_COMMAND}' in each of those VMs: under TCG "
                    "a restored VM translates bash, ld.so and libc again (its code cache starts empty)")
    figures.declare("api_list_rps", "requests/s",
                    note=f"GET /v1/vms/ (all records) listing {LIST_RECORDS} VM records, one client, "
                    "sequential; rate per batch of 10")
    shares.declare(figures)
    ssh.declare(figures)
    egress.declare(figures)
    volumes.declare(figures)
    browser.declare(figures)
    return figures


class PhaseFailed(Exception):
    pass


class Bench:
    def __init__(self, plan: Plan, json_path: Path | None, only: frozenset[str] = frozenset()) -> None:
        self.plan = plan
        self.json_path = json_path
        # Phases to run (prep and the server always run); empty: all of them.
        self.only = only
        self.figures = declare_figures()
        self.real_settings = Settings()
        self.root = Path(tempfile.mkdtemp(prefix="kiln-bench-"))
        self.host = host.describe_host(REPO)
        self.run_info: dict[str, Any] = {"mode": plan.mode, "notes": []}
        if only:
            self.run_info["only_phases"] = sorted(only)
        self.raw_vms: list[raw.RawVm] = []
        self.server: KilnServer | None = None
        self.api_key = ""
        self.owner_id = 0
        self.live_vm_ids: set[str] = set()
        self.image: BootImage | None = None
        self.accel = ""
        self.base: SavedState | None = None
        self.settings: Settings | None = None
        self.touched_snapshot_dir: Path | None = None

    # -- the run ---------------------------------------------------------------------

    def run(self) -> dict:
        started = time.monotonic()
        self.host["load_average_start"] = host.load_average()
        self.host["other_qemu_processes_start"] = host.other_qemu_processes(self.root)
        try:
            self.prepare()
            self.phase("raw", self.measure_raw, "raw_restore_ms", "raw_claim_ms", "raw_cold_boot_ms",
                       "exec_raw_agent_ms", "exec_raw_agent_python_ms")
            server_figures = [
                figure.name for figure in self.figures
                if not figure.name.startswith("raw_") and figure.name != "exec_raw_agent_ms"
                and figure.name != "exec_raw_agent_python_ms"
            ]
            self.phase("server", lambda: self.start_server(pool_size=0, log_name="server.log"),
                       *server_figures)
            self.phase("create_cold", self.measure_cold_creates, "create_cold_ms")
            self.phase("create_snapshot", self.measure_snapshot_creates, "create_snapshot_ms", "delete_ms")
            self.phase("exec", self.measure_exec, "exec_bash_ms", "exec_python_ms", "exec_python_first_ms")
            self.phase("snapshot_save", self.measure_touched_snapshot, "snapshot_save_ms",
                       "snapshot_size_mb", "restore_touched_ms")
            self.phase("concurrent", self.measure_concurrent_creates, "concurrent_creates_per_s",
                       "concurrent_create_ms", "concurrent_create_failures")
            self.phase("api_list", self.measure_listing, "api_list_rps")
            self.phase("volumes", self.measure_volumes, "root_write_mb_s", "volume_write_mb_s", "root_read_mb_s",
                       "volume_read_mb_s", "volume_checkpoint_1g_ms", "volume_checkpoint_1g_unmounted_ms",
                       "volume_hot_attach_ms", "volume_detach_ms")
            self.phase("shares", self.measure_shares, "share_direct_rps", "share_rps", "share_direct_ms", "share_ms",
                       "share_ws_rtt_ms", "share_wake_first_byte_ms")
            self.phase("ssh", self.measure_ssh, "exec_true_ms", "ssh_true_ms", "upload_mb_s", "scp_upload_mb_s")
            self.phase("density", self.measure_density, "density_idle_vms", "density_create_ms",
                       "density_rss_mb_per_vm", "density_pss_mb_per_vm", "density_cpu_pct_per_vm",
                       "density_exec_ms", "density_exec_first_ms")
            self.stop_server()
            self.phase("raw_touched", self.measure_raw_touched_restore, "raw_restore_touched_ms")
            self.phase("pool", self.measure_pool, "create_pool_ms", "exec_pool_first_ms")
            self.phase("egress", lambda: egress.measure(self), *egress.FIGURES)
            self.phase("browser", self.measure_browser, *browser.FIGURES)
        finally:
            self.cleanup()
        self.host["load_average_end"] = host.load_average()
        self.host["other_qemu_processes_end"] = host.other_qemu_processes(self.root)
        self.run_info["seconds"] = round(time.monotonic() - started, 1)
        self.run_info["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
        document = {"figures": self.figures.as_json(), "host": self.host, "run": self.run_info}
        if self.json_path is not None:
            self.json_path.write_text(json.dumps(document, indent=2) + "\n")
        return document

    def phase(self, name: str, measure: Callable[[], None], *produces: str) -> None:
        """Run one phase; a failure leaves the figures it ``produces`` without
        values (those it had not measured yet), with the reason, and the run goes on."""
        if self.only and name not in self.only and name != "server":
            for figure_name in produces:
                self.figures.missing(figure_name, f"phase {name} not run (--only)")
            return
        err.print(f"[bold]bench:[/bold] {name} ...")
        started = time.monotonic()
        try:
            measure()
        except Exception as error:
            reason = f"phase {name} failed: {type(error).__name__}: {error}"
            err.print(f"[red]bench:[/red] {reason}")
            self.run_info["notes"].append(reason)
            for figure_name in produces:
                self.figures.missing(figure_name, reason)
        finally:
            self.run_info.setdefault("phase_seconds", {})[name] = round(time.monotonic() - started, 1)

    def note(self, text: str) -> None:
        self.run_info["notes"].append(text)

    # -- prep ------------------------------------------------------------------------

    def prepare(self) -> None:
        from kiln.runtime.images import ImageStore
        from kiln.runtime.qemu import QemuHypervisor
        from kiln.runtime.snapshots import BaseSnapshots, Shape

        image = ImageStore(self.real_settings).get("default")
        if image is None:
            raise SystemExit("the default image is not built: run `kiln images build default` first")
        self.image = image
        hypervisor = QemuHypervisor(self.real_settings)

        async def decide_and_ensure() -> tuple[str, SavedState]:
            accel = await hypervisor.decide_accel(image)
            saved = await BaseSnapshots(self.real_settings, hypervisor).ensure(
                image, Shape(SHAPE_MEMORY_MB, SHAPE_VCPUS)
            )
            return accel, saved

        err.print("[bold]bench:[/bold] prep (accelerator, base snapshot) ...")
        self.accel, self.base = asyncio.run(decide_and_ensure())
        cache = self.root / "cache"
        link_cache(self.real_settings.cache_dir, cache, image)
        data_dir = self.root / "var"
        self.settings = bench_settings(
            self.root,
            data_dir=data_dir,
            cache_dir=cache,
            database_url=f"sqlite+aiosqlite:///{data_dir / 'kiln.db'}",
            accel=self.accel,
            default_memory_mb=SHAPE_MEMORY_MB,
            default_vcpu_count=SHAPE_VCPUS,
        )
        data_dir.mkdir(parents=True)
        self.owner_id, self.api_key = create_user_and_key(self.settings)
        self.run_info.update(
            accel=self.accel,
            image=str(Path(image.kernel).resolve().parent),
            base_snapshot=str(self.base.directory),
            shape=f"{SHAPE_MEMORY_MB} MB, {SHAPE_VCPUS} vCPU",
            raw_baseline_reuses="kiln.runtime.qemu.build_argv (the QEMU command line) and the base "
            "snapshot's files; QMP, agent frames, qemu-img and Popen are the bench's own minimal code",
            list_records="terminated VM rows copied from one the bench made, inserted directly "
            "through the store (kiln.store) into the server's database",
            data_dir=str(data_dir),
        )

    # -- raw baselines ----------------------------------------------------------------

    def measure_raw(self) -> None:
        assert self.image is not None and self.base is not None
        steps: dict[str, list[float]] = {}
        for index in range(self.plan.raw_restores):
            started = time.monotonic()
            vm = self.raw_restore(self.base, f"raw{index}")
            self.figures["raw_restore_ms"].add(ms_since(started))
            for name, seconds in vm.steps.items():
                steps.setdefault(name, []).append(seconds * 1000)
            if index == 0:
                self.measure_raw_exec(vm)
            self.stop_raw(vm)
        for index in range(self.plan.raw_restores):
            # As kiln's warm pool does: identity when it fills, the clock when claimed.
            vm = self.raw_restore(self.base, f"rawc{index}")
            time.sleep(POOL_SETTLE_SECONDS)
            started = time.monotonic()
            vm.agent.call("set_clock", time_ns=time.time_ns())
            self.figures["raw_claim_ms"].add(ms_since(started))
            self.stop_raw(vm)
        self.run_info["raw_restore_steps_median_ms"] = {
            name: round(sorted(values)[len(values) // 2], 1) for name, values in steps.items()
        }
        for index in range(self.plan.raw_cold_boots):
            started = time.monotonic()
            run_dir = self.root / "raw" / f"cold{index}"
            vm = raw.cold_boot(
                self.image, self.accel, run_dir, memory_mb=SHAPE_MEMORY_MB, vcpu_count=SHAPE_VCPUS
            )
            self.raw_vms.append(vm)
            self.figures["raw_cold_boot_ms"].add(ms_since(started))
            self.stop_raw(vm)

    def raw_restore(self, saved: SavedState, name: str, *, identity: bool = True) -> raw.RawVm:
        assert self.image is not None
        vm = raw.restore(
            saved, self.image, self.accel, self.root / "raw" / name, hostname=name, identity=identity
        )
        self.raw_vms.append(vm)
        return vm

    def stop_raw(self, vm: raw.RawVm) -> None:
        vm.stop()
        self.raw_vms.remove(vm)
        shutil.rmtree(vm.run_dir, ignore_errors=True)

    def measure_raw_exec(self, vm: raw.RawVm) -> None:
        argv = ["/bin/bash", "-c", BASH_COMMAND]
        # The first run of each pays for cold caches in the guest; not counted.
        vm.agent.call("exec", argv=argv, timeout=60)
        vm.agent.call("python_exec", session="bench", code=PYTHON_COMMAND, timeout=60)
        for _ in range(self.plan.exec_samples):
            started = time.monotonic()
            result = vm.agent.call("exec", argv=argv, timeout=60)
            self.figures["exec_raw_agent_ms"].add(ms_since(started))
            check(result.get("exit_code") == 0, f"raw exec failed: {result}")
            started = time.monotonic()
            result = vm.agent.call("python_exec", session="bench", code=PYTHON_COMMAND, timeout=60)
            self.figures["exec_raw_agent_python_ms"].add(ms_since(started))
            check(result.get("exit_code") == 0, f"raw python_exec failed: {result}")

    def measure_raw_touched_restore(self) -> None:
        if self.touched_snapshot_dir is None:
            raise PhaseFailed("no touched snapshot was made (see snapshot_save)")
        from kiln.runtime.qemu import QemuHypervisor

        saved = QemuHypervisor(self.real_settings).saved_state(self.touched_snapshot_dir)
        for index in range(self.plan.saves):
            started = time.monotonic()
            vm = self.raw_restore(saved, f"rawt{index}")
            self.figures["raw_restore_touched_ms"].add(ms_since(started))
            self.stop_raw(vm)

    # -- the kiln server ---------------------------------------------------------------

    def start_server(self, *, pool_size: int, log_name: str, env: dict[str, str] | None = None) -> None:
        assert self.settings is not None
        self.server = KilnServer(self.root, self.settings, pool_size=pool_size, log_name=log_name, env=env)
        self.server.start()
        self.run_info.setdefault("servers", []).append(
            {"url": self.server.url, "pid": self.server.process.pid if self.server.process else None,
             "pool_size": pool_size, "log": str(self.server.log_path)}
        )

    def stop_server(self) -> None:
        if self.server is None:
            return
        with contextlib.suppress(Exception):
            self.delete_vms(sorted(self.live_vm_ids))
        self.server.stop()
        self.server = None

    @contextlib.contextmanager
    def client(self) -> Iterator[httpx.Client]:
        assert self.server is not None
        with self.server.client(self.api_key) as client:
            yield client

    def create_vm(self, client: httpx.Client, body: dict | None = None) -> tuple[float, dict]:
        """Create and wait; returns (milliseconds, record). PhaseFailed unless running."""
        elapsed, response = self.try_create(client, body)
        if response.status_code != 200 or response.json().get("status") != "running":
            raise PhaseFailed(f"create answered {response.status_code}: {response.text[:500]}")
        return elapsed, response.json()

    def try_create(self, client: httpx.Client, body: dict | None = None) -> tuple[float, httpx.Response]:
        request = {
            "memory_mb": SHAPE_MEMORY_MB,
            "vcpu_count": SHAPE_VCPUS,
            "vm_lifetime_seconds": VM_LIFETIME_SECONDS,
            **(body or {}),
        }
        # None in ``body`` removes a default (a snapshot brings its own shape).
        request = {name: value for name, value in request.items() if value is not None}
        started = time.monotonic()
        response = client.post("/v1/vms", params={"wait": "true"}, json=request)
        elapsed = ms_since(started)
        if response.status_code == 200 and response.json().get("vm_id"):
            self.live_vm_ids.add(response.json()["vm_id"])
        return elapsed, response

    def delete_vm(self, client: httpx.Client, vm_id: str) -> float:
        started = time.monotonic()
        response = client.delete(f"/v1/vms/{vm_id}")
        elapsed = ms_since(started)
        if response.status_code in (200, 404):
            self.live_vm_ids.discard(vm_id)
        else:
            raise PhaseFailed(f"DELETE {vm_id} answered {response.status_code}: {response.text[:300]}")
        return elapsed

    def delete_vms(self, vm_ids: list[str]) -> None:
        """Delete in parallel (a few at a time: each one stops a QEMU)."""
        if not vm_ids:
            return

        def delete(vm_id: str) -> None:
            with self.client() as client:
                self.delete_vm(client, vm_id)

        with concurrent.futures.ThreadPoolExecutor(8) as workers:
            for future in [workers.submit(delete, vm_id) for vm_id in vm_ids]:
                with contextlib.suppress(Exception):
                    future.result()

    def execute(self, client: httpx.Client, session_id: str, command: str, language: str) -> float:
        started = time.monotonic()
        response = client.post(
            "/execute", json={"command": command, "session_id": session_id, "language": language}
        )
        elapsed = ms_since(started)
        if response.status_code != 200 or response.json().get("exit_code") != 0:
            raise PhaseFailed(f"/execute answered {response.status_code}: {response.text[:300]}")
        return elapsed

    def restored_from_snapshot(self, vm_id: str) -> bool | None:
        """Whether kiln restored this VM rather than booting it (from its run dir's
        machine.json); None when that cannot be told."""
        assert self.settings is not None
        try:
            description = json.loads((self.settings.vms_dir / vm_id / "machine.json").read_text())
        except (OSError, ValueError):
            return None
        return description.get("restored_from") is not None

    # -- phases against the server -------------------------------------------------------

    def measure_cold_creates(self) -> None:
        with self.client() as client:
            for memory_mb in COLD_SHAPES_MB[: self.plan.cold_creates]:
                elapsed, record = self.create_vm(client, {"memory_mb": memory_mb})
                if self.restored_from_snapshot(record["vm_id"]):
                    self.note(f"create_cold: a {memory_mb} MB VM was restored, not booted; sample dropped")
                else:
                    self.figures["create_cold_ms"].add(elapsed)
                self.delete_vm(client, record["vm_id"])
                # Kiln makes this shape's base snapshot in the background now;
                # wait for it, so it does not run under the next measurements.
                self.wait_for_base_snapshot(memory_mb)

    def wait_for_base_snapshot(self, memory_mb: int) -> None:
        assert self.settings is not None
        root = self.settings.cache_dir / "base-snapshots"
        marker = f"-{memory_mb}m-{SHAPE_VCPUS}c-"
        deadline = time.monotonic() + BASE_BUILD_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if any(marker in entry.name and not entry.name.startswith(".") for entry in root.iterdir()):
                return
            time.sleep(0.2)
        self.note(f"kiln did not make the base snapshot for {memory_mb} MB within "
                  f"{BASE_BUILD_TIMEOUT_SECONDS:g}s after a cold create")

    def measure_snapshot_creates(self) -> None:
        with self.client() as client:
            # Warm-up, not counted: the server's first create pays for imports and
            # first-use work (connections, caches) that no later create sees.
            _, record = self.create_vm(client)
            self.delete_vm(client, record["vm_id"])
            cold = 0
            for _ in range(self.plan.creates):
                elapsed, record = self.create_vm(client)
                if self.restored_from_snapshot(record["vm_id"]) is False:
                    cold += 1
                self.figures["create_snapshot_ms"].add(elapsed)
                self.figures["delete_ms"].add(self.delete_vm(client, record["vm_id"]))
            if cold:
                self.note(f"create_snapshot: {cold} of {self.plan.creates} creates booted cold")

    def measure_exec(self) -> None:
        with self.client() as client:
            _, record = self.create_vm(client)
            session_id = record["session_id"]
            started = time.monotonic()
            self.execute(client, session_id, PYTHON_COMMAND, "python")
            self.figures["exec_python_first_ms"].add(ms_since(started))
            self.execute(client, session_id, BASH_COMMAND, "bash")  # warm-up, as for raw
            for _ in range(self.plan.exec_samples):
                self.figures["exec_bash_ms"].add(self.execute(client, session_id, BASH_COMMAND, "bash"))
                self.figures["exec_python_ms"].add(
                    self.execute(client, session_id, PYTHON_COMMAND, "python")
                )
            self.delete_vm(client, record["vm_id"])

    def measure_shares(self) -> None:
        assert self.settings is not None and self.server is not None
        quick = self.plan.mode == "quick"
        with self.client() as client:
            vm_id = shares.measure(
                self.figures, client, self.settings, self.server.share_port,
                lambda body: self.create_vm(client, body)[1],
                seconds=2.0 if quick else 10.0, ws_samples=20 if quick else 200, wakes=1 if quick else 3,
            )  # fmt: skip
            self.delete_vm(client, vm_id)

    def measure_browser(self) -> None:
        assert self.settings is not None
        link_image(self.real_settings.cache_dir, self.settings.cache_dir, browser.prepare(self.real_settings))
        quick = self.plan.mode == "quick"
        # A server of its own: a restored browser VM's agent may take longer than the default boot time.
        self.start_server(pool_size=0, log_name="server-browser.log", env=browser.SERVER_ENV)
        try:
            with self.client() as client:
                browser.measure(self.figures, client, sessions=2 if quick else 5, actions=3 if quick else 10)
        finally:
            self.stop_server()

    def measure_ssh(self) -> None:
        assert self.server is not None
        quick = self.plan.mode == "quick"
        with self.client() as client:
            vm_id = ssh.measure(
                self.figures, client, self.root, self.server.ssh_port,
                lambda body: self.create_vm(client, body)[1],
                lambda session_id, command: self.execute(client, session_id, command, "bash"),
                samples=5 if quick else 30, transfers=1 if quick else 3,
            )  # fmt: skip
            self.delete_vm(client, vm_id)

    def measure_volumes(self) -> None:
        quick = self.plan.mode == "quick"
        with self.client() as client:
            vm_id = volumes.measure(
                self.figures, client, lambda: self.create_vm(client)[1],
                samples=2 if quick else 5, dd_mib=64 if quick else 256, fill_mib=128 if quick else 512,
            )  # fmt: skip
            self.delete_vm(client, vm_id)

    def measure_touched_snapshot(self) -> None:
        assert self.settings is not None
        with self.client() as client:
            _, record = self.create_vm(client, {"memory_mb": TOUCHED_VM_MEMORY_MB})
            vm_id, session_id = record["vm_id"], record["session_id"]
            # Non-zero bytes (zero pages would not be written), kept alive in the
            # session's interpreter.
            touch = f"touched = b'\\x01' * ({TOUCHED_MB} << 20)\nprint(len(touched) >> 20)"
            response = client.post(
                "/execute", json={"command": touch, "session_id": session_id, "language": "python"}
            )
            check(
                response.status_code == 200 and response.json().get("stdout", "").strip() == str(TOUCHED_MB),
                f"touching memory failed: {response.status_code} {response.text[:300]}",
            )
            snapshot_ids = []
            for index in range(self.plan.saves):
                started = time.monotonic()
                response = client.post(
                    f"/v1/vms/{vm_id}/snapshot", params={"wait": "true"}, json={"name": f"bench-touched-{index}"}
                )
                elapsed = ms_since(started)
                check(
                    response.status_code == 200 and response.json().get("status") == "ready",
                    f"snapshot answered {response.status_code}: {response.text[:300]}",
                )
                self.figures["snapshot_save_ms"].add(elapsed)
                self.figures["snapshot_size_mb"].add(response.json().get("size_bytes", 0) / 2**20)
                snapshot_ids.append(response.json()["snapshot_id"])
            self.delete_vm(client, vm_id)
            snapshot_id = snapshot_ids[0]
            self.touched_snapshot_dir = self.settings.snapshots_dir / snapshot_id
            for _ in range(self.plan.saves):
                elapsed, restored = self.create_vm(client, {"snapshot_id": snapshot_id, "memory_mb": None,
                                                            "vcpu_count": None})
                self.figures["restore_touched_ms"].add(elapsed)
                # The restored VM still holds the touched bytes (in the source
                # session's interpreter, which this VM's new session cannot
                # address by name; the guest's used memory shows them).
                used_mb = "awk '/MemTotal/{t=$2} /MemAvailable/{a=$2} END{print int((t-a)/1024)}' /proc/meminfo"
                response = client.post(
                    "/execute",
                    json={"command": used_mb, "session_id": restored["session_id"], "language": "bash"},
                )
                check(
                    response.status_code == 200 and int(response.json().get("stdout") or 0) >= TOUCHED_MB,
                    f"the restored VM does not hold the touched memory: {response.text[:300]}",
                )
                self.delete_vm(client, restored["vm_id"])

    def measure_concurrent_creates(self) -> None:
        failures: list[str] = []
        for _ in range(self.plan.concurrent_rounds):
            barrier = threading.Barrier(CONCURRENT_CREATES)
            results: list[tuple[float, int, str, float]] = []

            def create_one(barrier: threading.Barrier = barrier) -> tuple[float, int, str, float]:
                with self.client() as client:
                    barrier.wait()
                    try:
                        elapsed, response = self.try_create(client)
                    except httpx.HTTPError as error:
                        return 0.0, 0, f"{type(error).__name__}: {error}", time.monotonic()
                    status = response.json().get("status", "") if response.status_code == 200 else ""
                    detail = "" if status == "running" else f"{response.status_code} {response.text[:200]}"
                    return elapsed, response.status_code, detail, time.monotonic()

            started = time.monotonic()
            with concurrent.futures.ThreadPoolExecutor(CONCURRENT_CREATES) as workers:
                futures = [workers.submit(create_one) for _ in range(CONCURRENT_CREATES)]
                results = [future.result() for future in futures]
            # From the moment all threads were ready (they wait at the barrier).
            wall = max(result[3] for result in results) - started
            succeeded = [result for result in results if not result[2]]
            failures += [result[2] for result in results if result[2]]
            self.figures["concurrent_creates_per_s"].add(len(succeeded) / wall)
            self.figures["concurrent_create_failures"].add(float(len(results) - len(succeeded)))
            for result in succeeded:
                self.figures["concurrent_create_ms"].add(result[0])
            self.delete_vms(sorted(self.live_vm_ids))
        if failures:
            self.run_info["concurrent_create_failure_details"] = failures[:10]

    def measure_listing(self) -> None:
        assert self.settings is not None
        inserted = asyncio.run(insert_terminated_copies(self.settings, self.owner_id, LIST_RECORDS))
        with self.client() as client:
            listed = client.get("/v1/vms/").json()
            check(len(listed) >= LIST_RECORDS, f"GET /v1/vms/ listed {len(listed)} records")
            self.run_info["api_list_records"] = {"listed": len(listed), "inserted": inserted}
            deadline = time.monotonic() + self.plan.list_seconds
            while time.monotonic() < deadline:
                started = time.monotonic()
                for _ in range(10):
                    response = client.get("/v1/vms/")
                    check(response.status_code == 200, f"GET /v1/vms/ answered {response.status_code}")
                self.figures["api_list_rps"].add(10 / (time.monotonic() - started))

    def measure_density(self) -> None:
        assert self.settings is not None
        vm_records: list[dict] = []
        stop_reason = f"the bench's cap of {self.plan.density_max_vms} VMs"
        with self.client() as client:
            while len(vm_records) < self.plan.density_max_vms:
                elapsed, response = self.try_create(client)
                if response.status_code == 503:
                    stop_reason = f"admission: {response.json().get('detail')}"
                    break
                if response.status_code != 200 or response.json().get("status") != "running":
                    stop_reason = f"a create failed: {response.status_code} {response.text[:300]}"
                    break
                vm_records.append(response.json())
                self.figures["density_create_ms"].add(elapsed)
            self.figures["density_idle_vms"].add(float(len(vm_records)))
            self.run_info["density_stopped_by"] = stop_reason
            check(bool(vm_records), f"no VM could be started: {stop_reason}")
            time.sleep(self.plan.idle_settle_seconds)
            pids = [pid for pid in (self.qemu_pid(record["vm_id"]) for record in vm_records) if pid]
            for pid in pids:
                use = host.memory_use(pid)
                if use is not None:
                    self.figures["density_rss_mb_per_vm"].add(use.rss_mb)
                    self.figures["density_pss_mb_per_vm"].add(use.pss_mb)
            for share in host.cpu_share(pids, self.plan.cpu_window_seconds).values():
                self.figures["density_cpu_pct_per_vm"].add(share)
            self.run_info["density_load_average"] = host.load_average()
            used = vm_records[: self.plan.density_exec_samples]
            for record in used:
                self.figures["density_exec_first_ms"].add(
                    self.execute(client, record["session_id"], BASH_COMMAND, "bash")
                )
            for index in range(self.plan.density_exec_samples):
                record = used[index % len(used)]
                self.figures["density_exec_ms"].add(
                    self.execute(client, record["session_id"], BASH_COMMAND, "bash")
                )
        self.delete_vms([record["vm_id"] for record in vm_records])

    def qemu_pid(self, vm_id: str) -> int | None:
        assert self.settings is not None
        with contextlib.suppress(OSError, ValueError):
            return int((self.settings.vms_dir / vm_id / "qemu.pid").read_text().strip())
        return None

    # -- the warm pool ---------------------------------------------------------------------

    def measure_pool(self) -> None:
        assert self.settings is not None
        self.start_server(pool_size=self.plan.pool_size, log_name="server-pool.log")
        try:
            with self.client() as client:
                missed = 0
                for _ in range(self.plan.pool_creates):
                    warm = self.wait_for_pool(self.plan.pool_size)
                    elapsed, record = self.create_vm(client)
                    # Served by the pool when its QEMU ran before the request.
                    if self.qemu_pid(record["vm_id"]) in warm:
                        self.figures["create_pool_ms"].add(elapsed)
                        self.figures["exec_pool_first_ms"].add(
                            self.execute(client, record["session_id"], BASH_COMMAND, "bash")
                        )
                    else:
                        missed += 1
                    self.delete_vm(client, record["vm_id"])
                if missed:
                    self.note(f"create_pool_ms: {missed} of {self.plan.pool_creates} creates found "
                              "no idle VM in the pool (not counted)")
                if not self.figures["create_pool_ms"].values:
                    self.figures.missing("create_pool_ms", "no create was served by the warm pool")
                    self.figures.missing("exec_pool_first_ms", "no create was served by the warm pool")
        finally:
            self.stop_server()

    def wait_for_pool(self, size: int, timeout: float = 120.0) -> set[int]:
        """Wait until the pool holds ``size`` VMs and they had time to become
        ready; their QEMU pids. Called while the bench has no VM of its own, so
        every live QEMU under the VMs directory is an idle pool VM."""
        assert self.settings is not None
        deadline = time.monotonic() + timeout
        while True:
            run_dirs = list(self.settings.vms_dir.iterdir()) if self.settings.vms_dir.is_dir() else []
            pids = {
                pid
                for pid in (self.qemu_pid(run_dir.name) for run_dir in run_dirs)
                if pid is not None and host.cpu_seconds(pid) is not None
            }
            if len(pids) >= size or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        # The last one may still be loading its state; a restore takes well under this.
        time.sleep(POOL_SETTLE_SECONDS)
        return pids

    # -- cleanup ------------------------------------------------------------------------------

    def cleanup(self) -> None:
        """Remove every VM and process this run started; also after Ctrl-C."""
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # finish cleaning up first
        try:
            err.print("[bold]bench:[/bold] cleaning up ...")
            with contextlib.suppress(Exception):
                self.stop_server()
            if self.server is not None and self.server.process is not None:
                self.server.process.kill()
            for vm in list(self.raw_vms):
                with contextlib.suppress(Exception):
                    vm.stop()
            # Anything QEMU still running from this run's directories (a server
            # that died before deleting its VMs): stopped by pid.
            for pid in host.processes_under(self.root):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            if self.settings is not None:
                with contextlib.suppress(Exception):
                    remove_networking(self.settings)
            time.sleep(0.2)
            shutil.rmtree(self.root, ignore_errors=True)
        finally:
            signal.signal(signal.SIGINT, previous)


# ---- helpers


def ms_since(started: float) -> float:
    return (time.monotonic() - started) * 1000


def check(condition: bool, message: str) -> None:
    if not condition:
        raise PhaseFailed(message)


async def insert_terminated_copies(settings: Settings, owner_id: int, wanted: int) -> int:
    """Make the owner have ``wanted`` VM records: copies of a terminated VM the
    bench made earlier, with new ids, inserted through the store. Copying a row
    (rather than filling in fields) keeps this working as the table grows columns."""
    from kiln.store.db import Database
    from kiln.store.models import Vm
    from kiln.store.repositories import SessionRepository, VmRepository

    db = Database(settings.database)
    try:
        async with db.transaction() as session:
            vms = VmRepository(session)
            existing = await vms.list(owner_id)
            ended = [vm for vm in existing if vm.status == "terminated"]
            if not ended:
                raise PhaseFailed("no terminated VM of the bench user to copy")
            template = ended[0]
            columns = [column.key for column in Vm.__mapper__.column_attrs]
            missing = max(wanted - len(existing), 0)
            for _ in range(missing):
                copy = {name: getattr(template, name) for name in columns}
                copy["id"] = "vm-" + uuid.uuid4().hex[:16]
                copy["session_id"] = str(uuid.uuid4())
                await SessionRepository(session).get_or_add(owner_id, copy["session_id"])
                await vms.add(Vm(**copy))
        return missing
    finally:
        await db.close()


# ---- output


def format_value(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit in ("count", "VMs"):
        return f"{value:.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}"


def comparison(figure: Figure, figures: Figures) -> str:
    if figure.baseline is None or figure.median is None:
        return ""
    base = figures[figure.baseline]
    if not base.median:
        return f"vs {figure.baseline}: -"
    ratio = figure.median / base.median
    text = f"{ratio:.2f}x {figure.baseline}"
    if figure.unit == "ms":
        text += f" ({figure.median - base.median:+.1f} ms)"
    return text


def target_met(figure: Figure, figures: Figures) -> str:
    """The brief's targets, checked on medians; '' when the figure has none."""
    median = figure.median
    if figure.target is None:
        return ""
    if median is None:
        return "n/a"

    def base() -> float | None:
        return figures[figure.baseline].median if figure.baseline else None

    name = figure.name
    if name == "create_snapshot_ms":
        met = base() is not None and median <= 1.5 * base()  # type: ignore[operator]
    elif name == "exec_pool_first_ms":
        met = base() is not None and median <= 2 * base()  # type: ignore[operator]
    elif name == "create_pool_ms":
        met = median < 50
    elif name in ("exec_bash_ms", "exec_python_ms"):
        met = median < 10 and base() is not None and median <= base() + 5  # type: ignore[operator]
    elif name == "density_exec_ms":
        met = median < 50
    elif name == "density_idle_vms":
        met = median >= 40
    elif name == "concurrent_create_failures":
        met = max(figure.values) == 0
    else:
        return ""
    return "yes" if met else "NO"


def print_table(document: dict, figures: Figures, console: Console) -> None:
    run = document["run"]
    table = Table(title=f"kiln bench ({run['mode']}, accel {run.get('accel', '?')}, "
                  f"load {document['host'].get('load_average_start')} -> {document['host'].get('load_average_end')})")
    for column in ("figure", "median", "p95", "unit", "n", "vs baseline", "target", "met"):
        table.add_column(column, justify="right" if column in ("median", "p95", "n") else "left")
    for figure in figures:
        table.add_row(
            figure.name,
            format_value(figure.median, figure.unit),
            format_value(figure.p95, figure.unit),
            figure.unit,
            str(len(figure.values)),
            comparison(figure, figures) if figure.values else "null: " + (figure.reason or "")[:60],
            figure.target or "",
            target_met(figure, figures),
        )
    console.print(table)
    for note in run.get("notes", []):
        console.print(f"note: {note}")


PHASES = ("raw", "create_cold", "create_snapshot", "exec", "snapshot_save", "concurrent",
          "api_list", "density", "raw_touched", "pool", "shares", "ssh", "egress", "volumes", "browser")


def main(quick: bool, json_path: Path | None, only: str | None = None) -> int:
    phases = frozenset(name.strip() for name in (only or "").split(",") if name.strip())
    if unknown := phases - set(PHASES):
        raise SystemExit(f"unknown phase(s) {', '.join(sorted(unknown))}; phases: {', '.join(PHASES)}")
    bench = Bench(QUICK if quick else FULL, json_path, phases)
    document = bench.run()
    # Wide enough for full figure names even when stdout is not a terminal.
    print_table(document, bench.figures, Console(width=170))
    if json_path is not None:
        Console(stderr=True).print(f"bench: wrote {json_path}")
    return 0
