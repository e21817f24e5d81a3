"""The installed ``instavm`` CLI run as a user runs it, for tests that drive a live server.

A subprocess with ``INSTAVM_BASE_URL`` and ``INSTAVM_API_KEY`` in its
environment and its own ``HOME`` (so no profile of this machine's user leaks in).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

INSTAVM = Path(sys.executable).with_name("instavm")


@dataclass
class Cli:
    env: dict[str, str]

    @classmethod
    def of(cls, url: str, api_key: str, home: Path) -> Cli:
        env = {"PATH": os.environ["PATH"], "HOME": str(home), "TERM": "xterm", "LANG": "C.UTF-8"}
        return cls({**env, "INSTAVM_BASE_URL": url, "INSTAVM_API_KEY": api_key})

    def run(self, *argv: str, timeout: float = 180, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        """``stdin``: the answers to the CLI's prompts. The CLI runs in a session of its
        own then, without a controlling terminal, so ``getpass`` reads them from stdin too."""
        return subprocess.run(
            [str(INSTAVM), *argv],
            env=self.env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            start_new_session=stdin is not None,
        )

    def ok(self, *argv: str, timeout: float = 180) -> str:
        done = self.run(*argv, timeout=timeout)
        assert done.returncode == 0, f"instavm {' '.join(argv)}: {done.returncode}\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def json(self, *argv: str, timeout: float = 180) -> dict | list:
        return json.loads(self.ok(*argv, "--json", timeout=timeout))
