"""Starting (or adopting) and stopping the share router from ``kiln serve``.

Files in ``$KILN_DATA_DIR/router/`` (0700): ``router.{pid,log,json}``,
``router.sock`` (its control socket), and ``server.sock``, which the server
serves for it (``kiln.router.control``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from kiln.config import Settings
from kiln.proxy.supervisor import DaemonError, DaemonSupervisor


class RouterError(DaemonError):
    pass


class RouterSupervisor(DaemonSupervisor):
    error = RouterError

    def __init__(self, settings: Settings, *, python: str = sys.executable) -> None:
        state = settings.router_state_dir
        super().__init__(
            settings, module="kiln.router", name="router", state_dir=state, control_socket=state / "router.sock",
            python=python,
        )  # fmt: skip

    def adoptable(self, ping: dict) -> bool:
        # A router started before custom domains (or with another HTTPS port) is replaced.
        return bool(ping.get("https_port") == self.settings.share_https_port)

    @property
    def server_socket(self) -> Path:
        return self.state_dir / "server.sock"
