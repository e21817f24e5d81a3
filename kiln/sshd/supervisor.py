"""Starting (or adopting) and stopping the SSH gateway from ``kiln serve``.

Files in ``$KILN_DATA_DIR/sshd/`` (0700): ``sshd.{pid,log,json}``,
``sshd.sock`` (its control socket: ``ping``), ``server.sock`` (the guest
relay, served by the server: ``kiln.services.guest_relay``) and the host key
``ssh_host_ed25519_key`` (0600), made on the gateway's first start and kept.
"""

from __future__ import annotations

import sys
from pathlib import Path

from kiln.config import Settings
from kiln.proxy.supervisor import DaemonError, DaemonSupervisor

HOST_KEY_FILE = "ssh_host_ed25519_key"


class SshGatewayError(DaemonError):
    pass


class SshGatewaySupervisor(DaemonSupervisor):
    error = SshGatewayError

    def __init__(self, settings: Settings, *, python: str = sys.executable) -> None:
        state = settings.sshd_state_dir
        super().__init__(
            settings, module="kiln.sshd", name="sshd", state_dir=state, control_socket=state / "sshd.sock",
            python=python,
        )  # fmt: skip

    @property
    def relay_socket(self) -> Path:
        return self.state_dir / "server.sock"

    @property
    def host_key(self) -> Path:
        return self.state_dir / HOST_KEY_FILE
