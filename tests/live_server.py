"""A real Kiln server in a subprocess, for tests that drive it over HTTP with real VMs.

``kiln serve`` runs with its own data dir on a free port; the test talks to it
like any client (the instavm SDK, httpx, websockets, the CLI). ``stop()`` ends
it the way an operator does (SIGTERM: VMs keep running for the next start) or
the way a crash does (SIGKILL). ``destroy_leftover_vms`` is the safety net that
kills any VM process a test left behind, whatever happened to the server.
``serving`` is the whole lifetime a test module's server fixture wants: start,
yield, delete every VM, stop, destroy what is left, remove its files.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from kiln.config import Settings
from kiln.net import netns
from kiln.net.host import uninstall
from kiln.net.instances import separate_instance_env
from kiln.net.links import host_links
from kiln.proxy.supervisor import EgressSupervisor
from kiln.router.supervisor import RouterSupervisor
from kiln.runtime.cgroups import discover
from kiln.runtime.qemu import QEMU_BINARY, QemuHypervisor
from kiln.sshd.supervisor import SshGatewaySupervisor

STARTUP_SECONDS = 60.0
KILN = Path(sys.executable).with_name("kiln")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def short_data_dir(prefix: str) -> Path:
    # Unix socket paths (QMP, agent) under it must stay within 107 bytes.
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def server_settings(data_dir: Path) -> Settings:
    """What the server subprocess reads from its environment (KILN_CACHE_DIR,
    KILN_ACCEL pass through), with the test's data dir and network names."""
    names = {key.removeprefix("KILN_").lower(): value for key, value in network_env(data_dir).items()}
    return Settings(data_dir=data_dir, **names)


def ensure_default_image(settings: Settings) -> None:
    """Build (or find cached) the default image from the agent in this tree.

    Always asked for, not only when missing: a cached image made from an older
    agent would lack the ops these tests use. A cache hit takes seconds."""
    if shutil.which(QEMU_BINARY) is None:
        pytest.skip(f"{QEMU_BINARY} is not installed")
    from kiln.runtime.images import ImageStore

    ImageStore(settings).build("default")


@dataclass
class LiveServer:
    url: str
    data_dir: Path
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def admin_key(self) -> str:
        return (self.data_dir / "admin-api-key").read_text().strip()

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, crash: bool = False) -> None:
        """SIGTERM (a clean stop; VMs keep running) or SIGKILL (a crash)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL if crash else signal.SIGTERM)
            self.process.wait(timeout=30)


@functools.cache
def ssh_port(data_dir: Path) -> int:
    """The SSH gateway's port of the server of ``data_dir`` (kept across its restarts)."""
    return free_port()


@functools.cache
def network_env(data_dir: Path) -> dict[str, str]:
    """Host names and addresses of this server's guest networking, its own (from
    its data dir's name): servers running at once never share a namespace
    prefix, an nftables table, outside addresses, the egress daemon's address or
    its mark, the router's HTTPS port or a cgroup parent. Chosen once per data
    dir (the server, restarted or not, keeps its names)."""
    tag = hashlib.sha256(str(data_dir).encode()).hexdigest()
    return {
        **separate_instance_env(str(data_dir)),
        # The router's HTTPS listener (custom domains): never another server's port.
        "KILN_SHARE_HTTPS_PORT": str(free_port()),
        # Servers started from one test run share a cgroup: under one parent,
        # each one's reconciler would remove the others' VM cgroups as strays.
        "KILN_CGROUP_PARENT": f"kiln-{tag[:8]}",
    }


def start_server(
    data_dir: Path, port: int | None = None, env: dict[str, str] | None = None, listen: str = "127.0.0.1"
) -> LiveServer:
    """``env``: extra environment for the server (e.g. admission limits, KILN_CACHE_DIR);
    ``listen``: the address it listens on (0.0.0.0: every address of the host; the
    test still talks to it over loopback)."""
    port = port or free_port()
    log_path = data_dir.with_name(data_dir.name + ".log")
    env = {**os.environ, **network_env(data_dir), **(env or {}), "KILN_DATA_DIR": str(data_dir)}
    # Each server's SSH gateway on a port of its own (never 2222 of another Kiln, nor 22).
    env.setdefault("KILN_SSH_PORT", str(ssh_port(data_dir)))
    env.pop("KILN_DATABASE_URL", None)  # the test's own SQLite file, never a shared database
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [str(KILN), "serve", "--host", listen, "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = LiveServer(f"http://127.0.0.1:{port}", data_dir, process, log_path)
    deadline = time.monotonic() + STARTUP_SECONDS
    while True:
        if process.poll() is not None:
            _remove_daemons_of_failed_start(data_dir)
            raise RuntimeError(f"kiln serve exited at start:\n{server.log_tail()}")
        try:
            if httpx.get(f"{server.url}/healthz", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            server.stop(crash=True)
            _remove_daemons_of_failed_start(data_dir)
            raise RuntimeError(f"kiln serve did not answer in time:\n{server.log_tail()}")
        time.sleep(0.1)


@contextlib.contextmanager
def serving(
    prefix: str,
    env: dict[str, str] | None = None,
    *,
    build_image: bool = True,
    users: Callable[[], Iterable[str]] = list,
    after_stop: Callable[[LiveServer], None] | None = None,
) -> Iterator[LiveServer]:
    """A server over a fresh data dir (named from ``prefix``), started with the
    extra environment ``env`` (see ``start_server``), for as long as the block runs.

    At the end every live VM of the admin and of ``users`` (API keys, asked for
    then: users made during the tests) is deleted through the API, the server
    stopped, anything it left destroyed, and no VM run dir may remain.
    ``after_stop`` runs the module's own checks of the stopped server (its log,
    its daemons) before its files are removed. ``build_image``: make sure the
    default image is built from this tree first (``ensure_default_image``)."""
    data_dir = short_data_dir(prefix)
    settings = server_settings(data_dir)
    if build_image:
        ensure_default_image(settings)
    live = start_server(data_dir, env=env)
    try:
        yield live
    finally:
        try:
            terminate_live_vms(live.url, [live.admin_key, *users()])
        finally:
            live.stop()
            destroy_leftover_vms(settings)
            leftovers = list(settings.vms_dir.glob("*")) if settings.vms_dir.exists() else []
            try:
                assert not leftovers, f"VM run dirs left behind: {leftovers}"
                if after_stop is not None:
                    after_stop(live)
            finally:
                shutil.rmtree(data_dir, ignore_errors=True)
                live.log_path.unlink(missing_ok=True)


def _remove_daemons_of_failed_start(data_dir: Path) -> None:
    """A server that never answered leaves what it had started already (its
    egress daemon, share router, SSH gateway, nft table) to nobody: remove them.
    Best effort, the start's own error is what the test reports."""
    with contextlib.suppress(Exception):
        destroy_leftover_vms(server_settings(data_dir))


def run_cli(
    data_dir: Path, *args: str, stdin: str | None = None, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """The real ``kiln`` CLI on the database of the server of ``data_dir``, as an
    operator runs it on that host (``env``: more of its environment). It must succeed."""
    environment = {**os.environ, **(env or {}), "KILN_DATA_DIR": str(data_dir)}
    environment.pop("KILN_DATABASE_URL", None)
    done = subprocess.run(
        [str(KILN), *args], env=environment, input=stdin, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, done.stderr
    return done


def cli(server: LiveServer, *args: str, stdin: str | None = None) -> str:
    """What ``run_cli`` on ``server``'s data dir prints."""
    return run_cli(server.data_dir, *args, stdin=stdin).stdout


def terminate_live_vms(url: str, keys: list[str]) -> None:
    """DELETE every live VM of these users through the API."""
    for key in keys:
        headers = {"X-API-Key": key}
        for vm in httpx.get(f"{url}/v1/vms", headers=headers, timeout=30).json():
            httpx.delete(f"{url}/v1/vms/{vm['vm_id']}", headers=headers, timeout=60)


def destroy_leftover_vms(settings: Settings) -> list[str]:
    """After the server stopped: kill every VM process still holding a run dir
    under the data dir, stop the server's egress daemon (it outlives servers on
    purpose) and remove its nftables table. Returns the network namespaces and
    links of the server that were still there (removed too): its VMs were
    deleted, so there should be none."""
    return asyncio.run(destroy_leftovers(settings))


async def destroy_leftovers(settings: Settings) -> list[str]:
    """``destroy_leftover_vms`` for callers inside an event loop."""
    hypervisor = QemuHypervisor(settings)
    if settings.vms_dir.is_dir():
        for run_dir in settings.vms_dir.iterdir():
            await hypervisor.destroy(run_dir.name, run_dir)
    left = await leftover_links(settings)
    await EgressSupervisor(settings).stop()
    await RouterSupervisor(settings).stop()
    await SshGatewaySupervisor(settings).stop()
    await uninstall(settings)
    remove_cgroups(settings)
    return left


def remove_cgroups(settings: Settings) -> None:
    """The server's VM cgroups and their parent (its own, see ``network_env``),
    empty once its VMs are gone."""
    for parent in discover(settings.cgroup_parent).parents.values():
        if not parent.is_dir():
            continue
        for child in parent.iterdir():
            if child.is_dir():
                with contextlib.suppress(OSError):
                    child.rmdir()
        with contextlib.suppress(OSError):
            parent.rmdir()


async def leftover_links(settings: Settings) -> list[str]:
    prefix = settings.net_prefix
    names = [name for name in netns.names() if name.startswith(f"{prefix}ns-")]
    names += [name for name in await host_links() if name.startswith(f"{prefix}v")]
    for name in names:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True, check=False)
        subprocess.run(["ip", "link", "delete", name], capture_output=True, check=False)
    return names
