"""The environment every exec, python session and terminal starts with: the
defaults plus what ``set_env`` (and ``trust_ca``) added, kept in
``/etc/environment`` too so that it survives a restart of the agent and is
part of every snapshot."""

from __future__ import annotations

import os
import threading
from typing import Any

from .args import env_arg
from .files import write_atomically
from .wire import Emit, Handler, log

DEFAULT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "TERM": "xterm",
}


class Environment:
    def __init__(self, etc_dir: str) -> None:
        self.etc_dir = etc_dir
        self.overrides: dict[str, str] = {}
        self.lock = threading.Lock()

    def handlers(self) -> dict[str, Handler]:
        return {"set_env": self.op_set_env}

    def for_exec(self, extra: dict[str, str]) -> dict[str, str]:
        """The environment of a new process: defaults, then overrides, then ``extra``."""
        with self.lock:
            return {**DEFAULT_ENV, **self.overrides, **extra}

    def update(self, env: dict[str, str]) -> None:
        """Add ``env`` for every later process, and write ``/etc/environment``
        (best effort: the agent's own copy already has it)."""
        with self.lock:
            self.overrides.update(env)
            merged = dict(self.overrides)
            # Under the lock: two updates must not write the file in the wrong order.
            try:
                write_atomically(
                    os.path.join(self.etc_dir, "environment"),
                    "".join(f"{name}={quote_environment_value(value)}\n" for name, value in merged.items()),
                )
            except OSError as exc:
                log(f"could not write /etc/environment: {exc}")

    def op_set_env(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        """{"env": {name: value}} -> {}: every later exec and python session sees it."""
        self.update(env_arg(args, "env"))
        return {}


def quote_environment_value(value: str) -> str:
    """A value for /etc/environment: double-quoted, escaped so that a POSIX shell
    sourcing the file (``set -a; . /etc/environment``) gets the value back as it
    was (every character a double-quoted string treats specially: \\ " $ `)."""
    escaped = (
        value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$").replace("`", "\\`")
    )
    return '"' + escaped.replace("\n", "\\n") + '"'
