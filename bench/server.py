"""A kiln server of the bench's own: a temporary data dir, its own user and
API key, a free port, a subprocess (so the bench's client work does not share
its event loop, and a profiler can attach to it by pid).

The cache it sees (``KILN_CACHE_DIR``) is a temporary directory too, made of
links into the real cache: the image build the bench started with (pinned, so
an image rebuilt meanwhile does not change the VMs under measurement) and the
base snapshots already made. Whatever the server builds itself (the base
snapshot of a shape seen for the first time, after a cold create) lands in the
temporary cache and goes away with it, instead of filling the real one.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from kiln.config import Settings
from kiln.net.host import uninstall
from kiln.net.instances import separate_instance_env
from kiln.proxy.supervisor import EgressSupervisor
from kiln.router.supervisor import RouterSupervisor
from kiln.runtime.driver import BootImage
from kiln.sshd.supervisor import SshGatewaySupervisor

HEALTH_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 20.0
BENCH_USER = "bench"
REQUEST_TIMEOUT_SECONDS = 300.0
# What the bench's server admits beyond its memory limit (kiln/services/memory_pressure.py).
MEMORY_OVERCOMMIT = 3.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@functools.cache
def network_env(root: Path) -> dict[str, str]:
    """The ``KILN_NET_*`` names and ranges of the bench's servers (one at a time,
    all alike: chosen once per run)."""
    return separate_instance_env(str(root))


def bench_settings(root: Path, **values: Any) -> Settings:
    """``Settings`` of the bench's servers, their networking names included."""
    # Strings as in the environment; pydantic parses them as it does there.
    names: dict[str, Any] = {key.removeprefix("KILN_").lower(): value for key, value in network_env(root).items()}
    return Settings(**names, **values)


def remove_networking(settings: Settings) -> None:
    """After the last server: its egress daemon (it outlives servers on purpose)
    and Kiln's nftables table (left for the next server to keep VMs' rules)."""

    async def work() -> None:
        await EgressSupervisor(settings).stop()
        await uninstall(settings)

    asyncio.run(work())


def link_cache(real_cache: Path, bench_cache: Path, image: BootImage) -> None:
    (bench_cache / "images").mkdir(parents=True)
    (bench_cache / "base-snapshots").mkdir()
    link_image(real_cache, bench_cache, image)


def link_image(real_cache: Path, bench_cache: Path, image: BootImage) -> None:
    """One more image build in the bench's cache, and the base snapshots the real cache has now."""
    # ImageStore follows "<variant>.current"; an absolute target pins this build.
    (bench_cache / "images" / f"{image.variant}.current").symlink_to(Path(image.kernel).resolve().parent)
    base = bench_cache / "base-snapshots"
    real_base = real_cache / "base-snapshots"
    if real_base.is_dir():
        for entry in real_base.iterdir():
            if entry.is_dir() and not entry.name.startswith(".") and not (base / entry.name).exists():
                (base / entry.name).symlink_to(entry.resolve())


def create_user_and_key(settings: Settings) -> tuple[int, str]:
    """The bench's own user and API key, made in the database directly (as
    ``kiln users create`` / ``kiln keys create`` do), before the server starts."""
    from kiln.services.users import UserService
    from kiln.store.db import Database

    async def work() -> tuple[int, str]:
        db = Database(settings.database)
        try:
            await db.migrate()
            users = UserService(db)
            user = await users.create_user(BENCH_USER, None)
            return user.id, (await users.create_api_key(user.id, "bench")).key
        finally:
            await db.close()

    return asyncio.run(work())


class KilnServer:
    def __init__(
        self, root: Path, settings: Settings, *, pool_size: int, log_name: str, env: dict[str, str] | None = None
    ) -> None:
        self.root = root
        self.settings = settings
        self.pool_size = pool_size
        self.extra_env = env or {}
        self.port = free_port()
        self.share_port = free_port()
        self.ssh_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = root / log_name
        self.process: subprocess.Popen | None = None

    def environment(self) -> dict[str, str]:
        # The caller's KILN_ variables (admission limits, ...) pass through,
        # except those that would point the server at real data.
        env = {
            name: value
            for name, value in os.environ.items()
            # KILN_NET_*: the host names and addresses of guest networking, so a
            # bench on a shared machine can take its own (the defaults may be in use).
            if not name.startswith("KILN_") or name.startswith(("KILN_MAX_", "KILN_NET_"))
        }
        env.update(
            KILN_DATA_DIR=str(self.settings.data_dir),
            KILN_CACHE_DIR=str(self.settings.cache_dir),
            KILN_DATABASE_URL=self.settings.database,
            KILN_ACCEL=self.settings.accel,
            KILN_HOST="127.0.0.1",
            KILN_PORT=str(self.port),
            KILN_POOL_SIZE=str(self.pool_size),
            KILN_SHARE_HTTP_PORT=str(self.share_port),
            KILN_SSH_PORT=str(self.ssh_port),
            # The shape every bench VM has, so a pool (which warms the default
            # shape) holds VMs the bench asks for.
            KILN_DEFAULT_MEMORY_MB=str(self.settings.default_memory_mb),
            KILN_DEFAULT_VCPU_COUNT=str(self.settings.default_vcpu_count),
            # Idle VMs hold a fraction of their size (density_pss_mb_per_vm): admission
            # counting each at its whole size stopped the density phase at ~70 VMs on a
            # 24 GB host. The memory floors (KILN_MEMORY_FLOOR_MB) guard the host instead.
            KILN_MEMORY_OVERCOMMIT=str(MEMORY_OVERCOMMIT),
        )
        # Guest networking of its own (other people's servers run on this host too).
        env.update(network_env(self.root))
        env.update(self.extra_env)
        return env

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "kiln.cli", "serve", "--port", str(self.port)],
                env=self.environment(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                # Its own session: a Ctrl-C reaches only the bench, which then
                # removes the VMs through the server before stopping it.
                start_new_session=True,
            )
        deadline = time.monotonic() + HEALTH_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"kiln serve exited at start-up; see {self.log_path}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/healthz", timeout=1.0).status_code == 200:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"kiln serve did not answer /healthz within {HEALTH_TIMEOUT_SECONDS:g}s")

    def stop(self) -> None:
        """SIGTERM (the server leaves VMs running: the caller removed them
        first, and sweeps what is left by path)."""
        process, self.process = self.process, None
        # The share router, the SSH gateway and the egress daemon outlive servers on purpose (like
        # VMs): the bench's go with its server (by the pid files of its data dir).
        asyncio.run(self._stop_host_daemons())
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    async def _stop_host_daemons(self) -> None:
        await RouterSupervisor(self.settings).stop()
        await SshGatewaySupervisor(self.settings).stop()
        await EgressSupervisor(self.settings).stop()

    def client(self, api_key: str) -> httpx.Client:
        return httpx.Client(
            base_url=self.url,
            headers={"X-API-Key": api_key},
            timeout=REQUEST_TIMEOUT_SECONDS,
        )
