"""Environment variables staged for a VM's next command (``POST /v1/vms/{id}/stage-env``).

The instavm CLI stages secrets (API keys for a devbox) just before it opens a
terminal. The values live only in this server's memory: never in the store,
never in the guest's ``/etc/environment`` (which ``set_env`` writes, and which
every snapshot of the VM would then carry). The next command run in the VM (a
bash or python execution, a streamed one, an async task, or a new terminal)
takes them, and they are gone from the server; staging again replaces what was
staged before. A server restart forgets what no command took.
"""

from __future__ import annotations

import re
import threading

from kiln.services.errors import InvalidRequest

NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
MAX_ENTRIES = 64
MAX_VALUE_BYTES = 64 * 1024


def check_entries(entries: list[tuple[str, str]]) -> dict[str, str]:
    """The entries as an environment, or a 422 naming the entry that cannot be one."""
    if len(entries) > MAX_ENTRIES:
        raise InvalidRequest.single(("entries",), f"at most {MAX_ENTRIES} entries")
    env: dict[str, str] = {}
    for index, (name, value) in enumerate(entries):
        if not NAME_PATTERN.fullmatch(name):
            raise InvalidRequest.single(
                ("entries", index, "env_name"),
                "must be a variable name (letters, digits, '_'; not starting with a digit)",
            )
        if "\0" in value or len(value.encode()) > MAX_VALUE_BYTES:
            raise InvalidRequest.single(
                ("entries", index, "value"),
                f"must be at most {MAX_VALUE_BYTES} bytes, without NUL characters",
            )
        env[name] = value
    return env


class StagedEnv:
    """What is staged, by VM id. Shared by the execution and terminal services."""

    def __init__(self) -> None:
        self._staged: dict[str, dict[str, str]] = {}
        # Routes and background tasks run in one event loop, but a lock keeps a
        # take and a stage of the same VM from ever interleaving.
        self._lock = threading.Lock()

    def stage(self, vm_id: str, env: dict[str, str]) -> list[str]:
        with self._lock:
            self._staged[vm_id] = dict(env)
        return sorted(env)

    def take(self, vm_id: str) -> dict[str, str]:
        """What is staged for ``vm_id`` (empty when nothing is); it is staged no more."""
        with self._lock:
            return self._staged.pop(vm_id, {})
