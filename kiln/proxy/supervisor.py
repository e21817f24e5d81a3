"""Starting and stopping the egress daemon from the server.

One daemon per host (per ``KILN_DATA_DIR``). It runs in its own session, so
like the VMs it outlives a restart (or a ``kill -9``) of the server, which
then adopts it: ``start`` keeps a daemon that answers on the control socket
and was started with the same settings, and replaces any other. Its pid is
in ``net/egress.pid``, its log in ``net/egress.log``, the settings it runs
with in ``net/egress.json`` (0600).
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


class EgressDaemonError(RuntimeError):
    pass


class EgressSupervisor:
    def __init__(self, settings: Settings, *, python: str = sys.executable) -> None:
        self.settings = settings
        self.python = python
        self.feed = PolicyDirectory(settings.net_state_dir)
        state = settings.net_state_dir
        self.pid_file = state / "egress.pid"
        self.log_file = state / "egress.log"
        self.config_file = state / "egress.json"
        self._process: subprocess.Popen | None = None

    async def ping(self) -> dict | None:
        try:
            answer = await request(self.feed.control_socket, {"op": "ping"}, timeout=1.0)
        except (OSError, TimeoutError, ValueError):
            return None
        return answer if answer.get("ok") else None

    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _is_daemon(pid) else None

    async def start(self) -> int:
        """Make sure the daemon runs (adopting a live one started with these
        settings, replacing one started with others); returns its pid."""
        self.feed.ensure()
        config = self.settings.model_dump_json()
        running = await self.ping()
        if running is not None and running.get("pid") == self.pid() and self._config() == config:
            return int(running["pid"])
        await self.stop()
        fd = os.open(self.config_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write(config)
        with self.log_file.open("ab") as log:
            # Popen returns at once (fork+exec); the daemon's start is awaited below.
            self._process = subprocess.Popen(  # noqa: ASYNC220
                [self.python, "-m", "kiln.proxy", "--config", str(self.config_file)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pid_file.write_text(f"{self._process.pid}\n")
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise EgressDaemonError(f"the egress daemon exited at start: {self._log_tail()}")
            answer = await self.ping()
            if answer is not None and answer.get("pid") == self._process.pid:
                return self._process.pid
            await asyncio.sleep(POLL_SECONDS)
        await self.stop()
        raise EgressDaemonError(f"the egress daemon did not answer within {START_SECONDS:g}s: {self._log_tail()}")

    async def stop(self) -> None:
        """Stop the daemon: this one's child, and the one the pid file names (an
        earlier server's, or another supervisor's since); idempotent."""
        targets = [self._process.pid] if self._process is not None and self._process.poll() is None else []
        recorded = self.pid()  # only a live egress daemon: a pid file never names a recycled pid here
        if recorded is not None and recorded not in targets:
            targets.append(recorded)
        for pid in targets:
            for sig, wait in ((signal.SIGTERM, STOP_GRACE_SECONDS), (signal.SIGKILL, 5.0)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
                deadline = time.monotonic() + wait
                while time.monotonic() < deadline and _alive(pid, self._process):
                    await asyncio.sleep(POLL_SECONDS)
                if not _alive(pid, self._process):
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


def _alive(pid: int, process: subprocess.Popen | None) -> bool:
    if process is not None and process.pid == pid:
        return process.poll() is None
    return _is_daemon(pid)


def _is_daemon(pid: int) -> bool:
    """True if ``pid`` is a live egress daemon (a recycled pid is never taken for one)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X") and b"kiln.proxy" in argv
