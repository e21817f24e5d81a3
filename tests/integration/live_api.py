"""Driving a real ``kiln serve`` over HTTP in integration tests: the client,
the server's lifetime (nothing may be left running after it), and /proc checks
that never kill processes by name (other people's VMs run on this machine)."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import httpx
from live_server import (
    LiveServer,
    destroy_leftover_vms,
    ensure_default_image,
    server_settings,
    short_data_dir,
    start_server,
    terminate_live_vms,
)

from kiln.config import Settings
from kiln.runtime.images import ImageStore
from kiln.runtime.qemu import QemuHypervisor
from kiln.runtime.snapshots import BaseSnapshots, Shape

DEFAULTS = Settings()
DEFAULT_SHAPE = {"memory_mb": DEFAULTS.default_memory_mb, "vcpu_count": DEFAULTS.default_vcpu_count}
SMALL = {"memory_mb": 256, "vcpu_count": 1}  # cached base snapshot (the SDK tests' shape)


class Api:
    """An httpx client of one live server, with the few calls these tests repeat."""

    def __init__(self, server: LiveServer) -> None:
        self.connect(server)
        self.settings = server_settings(server.data_dir)

    def connect(self, server: LiveServer) -> None:
        """Talk to ``server`` from now on (a restarted one, after a crash)."""
        if getattr(self, "http", None) is not None:
            self.http.close()
        self.server = server
        self.http = httpx.Client(base_url=server.url, headers={"X-API-Key": server.admin_key}, timeout=180)

    def create(self, wait: bool = True, **fields: object) -> httpx.Response:
        return self.http.post("/v1/vms", params={"wait": wait}, json=fields)

    def create_ok(self, wait: bool = True, **fields: object) -> dict:
        response = self.create(wait, **fields)
        assert response.status_code == 200, f"{response.status_code} {response.text}"
        return response.json()

    def vm(self, vm_id: str) -> dict:
        response = self.http.get(f"/v1/vms/{vm_id}")
        assert response.status_code == 200, response.text
        return response.json()

    def wait_for(self, vm_id: str, statuses: set[str], timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            record = self.vm(vm_id)
            if record["status"] in statuses or time.monotonic() > deadline:
                return record
            time.sleep(0.05)

    def delete(self, vm_id: str) -> httpx.Response:
        return self.http.delete(f"/v1/vms/{vm_id}")

    def run(self, session_id: str, command: str, language: str = "bash") -> str:
        response = self.http.post(
            "/execute", json={"session_id": session_id, "command": command, "language": language}
        )
        assert response.status_code == 200, response.text
        result = response.json()
        assert result["exit_code"] == 0, result
        return result["stdout"]

    def run_dir(self, vm_id: str) -> Path:
        return self.settings.vms_dir / vm_id

    def qemu_pid(self, vm_id: str) -> int:
        return int((self.run_dir(vm_id) / "qemu.pid").read_text())


def process_exists(pid: int) -> bool:
    """True while ``pid`` is a process that has not exited (zombies count as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def qemu_pids_under(directory: Path) -> list[int]:
    """Live qemu-system processes whose command line names ``directory``."""
    marker = str(directory.resolve()).encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            argv
            and os.path.basename(argv[0]).startswith(b"qemu-system")
            and any(marker in part for part in argv)
            and process_exists(int(entry.name))
        ):
            pids.append(int(entry.name))
    return pids


def wait_until(condition: Callable[[], object], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return bool(condition())


def parse_time(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def assert_gone(api: Api, vm_id: str, pid: int) -> None:
    """No QEMU process and no run dir left of this VM."""
    assert wait_until(lambda: not process_exists(pid), 5), f"QEMU {pid} of {vm_id} still runs"
    assert not api.run_dir(vm_id).exists(), f"run dir of {vm_id} left behind"


def build_images(settings: Settings) -> None:
    """Both variants built, and the base snapshots of the shapes these tests use
    made (cache hits take seconds; after an image change, a cold boot each)."""
    ensure_default_image(settings)
    store = ImageStore(settings)
    store.build("minimal")
    base = BaseSnapshots(settings, QemuHypervisor(settings))
    wanted = [("default", Shape(**SMALL)), ("default", Shape(**DEFAULT_SHAPE)), ("minimal", Shape(**SMALL))]

    async def ensure() -> None:
        for variant, shape in wanted:
            image = store.get(variant)
            assert image is not None
            await base.ensure(image, shape)

    asyncio.run(ensure())


@contextmanager
def live_server(prefix: str, env: dict[str, str] | None = None, listen: str = "127.0.0.1") -> Iterator[Api]:
    """A server over a fresh data dir; at the end every VM is deleted through the
    API, the server stopped, and no QEMU process of the data dir may remain."""
    data_dir = short_data_dir(prefix)
    server = start_server(data_dir, env=env, listen=listen)
    api = Api(server)
    try:
        yield api  # a test may swap api.server for a restarted one
    finally:
        try:
            terminate_live_vms(api.server.url, [api.server.admin_key])
        finally:
            api.http.close()
            api.server.stop()
            left_running = qemu_pids_under(data_dir)
            left_links = destroy_leftover_vms(server_settings(data_dir))
            left_dirs = list(api.settings.vms_dir.glob("*")) if api.settings.vms_dir.exists() else []
            shutil.rmtree(data_dir, ignore_errors=True)
            api.server.log_path.unlink(missing_ok=True)
            assert not left_running, f"QEMU processes left running: {left_running}"
            assert not left_dirs, f"VM run dirs left behind: {left_dirs}"
            assert not left_links, f"network namespaces or links left behind: {left_links}"
