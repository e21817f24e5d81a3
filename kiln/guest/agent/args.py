"""Reading a request's arguments: a missing or mistyped one is EINVAL, never a crash."""

from __future__ import annotations

import base64
import os
from typing import Any

from .errors import AgentError

_REQUIRED = object()


def arg(args: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = _REQUIRED) -> Any:
    """One validated request argument; a missing or mistyped one is EINVAL."""
    if name not in args or args[name] is None:
        if default is _REQUIRED:
            raise AgentError("EINVAL", f"missing argument {name!r}")
        return default
    value = args[name]
    # bool is an int subclass: an int argument must not silently accept true.
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise AgentError("EINVAL", f"argument {name!r} must be {kind}")
    if not isinstance(value, kind):
        raise AgentError("EINVAL", f"argument {name!r} must be {kind}")
    return value


def b64_arg(args: dict[str, Any], name: str, default: bytes | None = None) -> bytes:
    text = arg(args, name, str, None)
    if text is None:
        if default is None:
            raise AgentError("EINVAL", f"missing argument {name!r}")
        return default
    try:
        return base64.b64decode(text, validate=True)
    except ValueError as exc:
        raise AgentError("EINVAL", f"argument {name!r} is not base64: {exc}") from None


def env_arg(args: dict[str, Any], name: str) -> dict[str, str]:
    env: dict[str, str] = arg(args, name, dict, {})
    for key, value in env.items():
        if not key or "=" in key or "\0" in key or not isinstance(value, str) or "\0" in value:
            raise AgentError("EINVAL", f"bad environment entry {key!r}")
    return env


def timeout_arg(args: dict[str, Any], default: float, maximum: float, name: str = "timeout") -> float:
    """Seconds an op may take, ``0 < value <= maximum``: every new op is bounded."""
    value = float(arg(args, name, (int, float), default))
    if not 0 < value <= maximum:
        raise AgentError("EINVAL", f"{name} must be more than 0 and at most {maximum:g} seconds")
    return value


def absolute_path_arg(args: dict[str, Any], name: str) -> str:
    """An absolute path, normalised (no ``.`` or ``..`` left, no trailing slash)."""
    path = arg(args, name, str)
    if not path.startswith("/") or "\0" in path or "\n" in path:
        raise AgentError("EINVAL", f"{name} must be an absolute path")
    return "/" + os.path.normpath(path).lstrip("/")
