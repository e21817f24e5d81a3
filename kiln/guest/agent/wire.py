"""What every module of the agent shares: the frame format, the handler shape, logging."""

from __future__ import annotations

import base64
import sys
from collections.abc import Callable
from typing import Any

# In a guest the agent is the top-level package ``agent`` beside protocol.py
# (/opt/kiln/agent/ and /opt/kiln/protocol.py); on a host it is kiln.guest.agent.
if __name__.startswith("kiln."):
    from kiln.guest import protocol
else:  # pragma: no cover - the in-guest layout
    import protocol  # type: ignore[no-redef, import-not-found, unused-ignore]

__all__ = ["Emit", "Handler", "b64", "log", "protocol"]

# A handler's way to send events (stdout/stderr frames) before its result.
Emit = Callable[[dict[str, Any]], None]
# An op: (request, emit) -> the result value; errors are raised (errors.AgentError).
Handler = Callable[[dict[str, Any], Emit], dict[str, Any]]


def log(message: str) -> None:
    """A line on the agent's stderr, which is the guest's console."""
    print(f"kiln-agent: {message}", file=sys.stderr, flush=True)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
