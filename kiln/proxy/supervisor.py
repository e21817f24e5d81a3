"""Starting and stopping Kiln's host daemons from the server.

``DaemonSupervisor`` runs ``python -m <module> --config FILE`` in its own
session, so like the VMs a daemon outlives a restart (or a ``kill -9``) of the
server, which then adopts it: ``start`` keeps a daemon that answers ``ping`` on
its control socket and was started with the same settings, and replaces any
other. Its pid, log and settings (0600) are files in its state dir.
``EgressSupervisor`` is the egress daemon's (``net/egress.*``); the share
router has its own (``kiln.router.supervisor``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from kiln.config import Settings
from kiln.net.feed import PolicyDirectory, request

START_SECONDS = 15.0
STOP_GRACE_SECONDS = 3.0
POLL_SECONDS = 0.02


class DaemonError(RuntimeError):
    pass


class EgressDaemonError(DaemonError):
    pass


class DaemonSupervisor:
    """One daemon: ``module`` run with the settings, files ``<name>.*`` in ``state_dir``."""

    error: type[DaemonError] = DaemonError

    def __init__(
        self,
        settings: Settings,
        *,
        module: str,
        name: str,
        state_dir: Path,
        control_socket: Path,
        python: str = sys.executable,
    ) -> None:
        self.settings = settings
        self.python = python
        self.module = module
        self.name = name
        self.state_dir = state_dir
        self.control_socket = control_socket
        self.pid_file = state_dir / f"{name}.pid"
        self.log_file = state_dir / f"{name}.log"
        self.config_file = state_dir / f"{name}.json"
        self._process: subprocess.Popen | None = None

    def prepare(self) -> None:
        """Before a start: the state dir (0700)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.state_dir.chmod(0o700)

    async def ping(self) -> dict | None:
        try:
            answer = await request(self.control_socket, {"op": "ping"}, timeout=1.0)
        except (OSError, TimeoutError, ValueError):
            return None
        return answer if answer.get("ok") else None

    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _is_daemon(pid, self.module) else None

    async def start(self) -> int:
        """Make sure the daemon runs (adopting a live one started with these
        settings, replacing one started with others); returns its pid."""
        self.prepare()
        config = self.settings.model_dump_json()
        running = await self.ping()
        if (
            running is not None
            and running.get("pid") == self.pid()
            and self._config() == config
            and self.adoptable(running)
        ):
            return int(running["pid"])
        await self.stop()
        fd = os.open(self.config_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write(config)
        with self.log_file.open("ab") as log:
            # Popen returns at once (fork+exec); the daemon's start is awaited below.
            self._process = subprocess.Popen(  # noqa: ASYNC220
                [self.python, "-m", self.module, "--config", str(self.config_file)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pid_file.write_text(f"{self._process.pid}\n")
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise self.error(f"the {self.name} daemon exited at start: {self._log_tail()}")
            answer = await self.ping()
            if answer is not None and answer.get("pid") == self._process.pid:
                return self._process.pid
            await asyncio.sleep(POLL_SECONDS)
        await self.stop()
        raise self.error(f"the {self.name} daemon did not answer within {START_SECONDS:g}s: {self._log_tail()}")

    def adoptable(self, ping: dict) -> bool:
        """Whether a running daemon (its ping answer) may be kept as it is."""
        return True

    async def stop(self) -> None:
        """Stop the daemon: this one's child, and the one the pid file names (an
        earlier server's, or another supervisor's since); idempotent."""
        targets = [self._process.pid] if self._process is not None and self._process.poll() is None else []
        recorded = self.pid()  # only a live daemon of this module: a pid file never names a recycled pid here
        if recorded is not None and recorded not in targets:
            targets.append(recorded)
        for pid in targets:
            for sig, wait in ((signal.SIGTERM, STOP_GRACE_SECONDS), (signal.SIGKILL, 5.0)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
                deadline = time.monotonic() + wait
                while time.monotonic() < deadline and _alive(pid, self._process, self.module):
                    await asyncio.sleep(POLL_SECONDS)
                if not _alive(pid, self._process, self.module):
                    break
        self._process = None
        self.pid_file.unlink(missing_ok=True)

    def _config(self) -> str | None:
        """The settings the running daemon was started with (a new KILN_DNS_UPSTREAM,
        say, needs a new daemon)."""
        try:
            return self.config_file.read_text()
        except OSError:
            return None

    def _log_tail(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-2000:].strip()
        except OSError:
            return ""


class EgressSupervisor(DaemonSupervisor):
    """The egress daemon (``kiln.proxy``): ``net/egress.{pid,log,json}``, ``net/egress.sock``."""

    error = EgressDaemonError

    def __init__(self, settings: Settings, *, python: str = sys.executable) -> None:
        self.feed = PolicyDirectory(settings.net_state_dir)
        super().__init__(
            settings,
            module="kiln.proxy",
            name="egress",
            state_dir=settings.net_state_dir,
            control_socket=self.feed.control_socket,
            python=python,
        )

    def prepare(self) -> None:
        self.feed.ensure()


def _alive(pid: int, process: subprocess.Popen | None, module: str) -> bool:
    if process is not None and process.pid == pid:
        return process.poll() is None
    return _is_daemon(pid, module)


def _is_daemon(pid: int, module: str) -> bool:
    """True if ``pid`` is a live daemon of ``module`` (a recycled pid is never taken for one)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X") and module.encode() in argv
