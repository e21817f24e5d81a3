"""Service hosts: which outgoing names a vault service covers.

A service's ``host`` is an exact host name (``api.openai.com``) or a one-level
wildcard (``*.example.com``: ``a.example.com``, not ``example.com`` nor
``a.b.example.com``), the way a TLS certificate's wildcard matches. An IP
address is not a host: TLS clients send no server name for one, and the guest
DNS never hands one out, so it could never be intercepted.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TypeVar

# A DNS label: letters, digits, hyphens inside, at most 63 characters.
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
MAX_HOST_LENGTH = 253

T = TypeVar("T")


class HostError(ValueError):
    """Not a host name or a one-level ``*.`` wildcard; ``str()`` says why."""


def canonical_name(name: str) -> str | None:
    """``name`` lower-cased without a trailing dot, or None if it is no DNS host name."""
    name = name.strip().lower().removesuffix(".")
    labels = name.split(".")
    if not name or len(name) > MAX_HOST_LENGTH or len(labels) < 2:
        return None
    if not all(_LABEL.fullmatch(label) for label in labels) or labels[-1].isdigit():
        return None
    return name


def parse_service_host(host: str) -> str:
    """The canonical form of a service host; HostError for anything else."""
    wildcard = host.strip().startswith("*.")
    name = canonical_name(host.strip()[2:] if wildcard else host)
    if name is None:
        raise HostError(f"{host!r} is not a host name (like api.example.com) or a '*.example.com' wildcard")
    return f"*.{name}" if wildcard else name


def host_matches(pattern: str, name: str) -> bool:
    """Whether ``name`` (canonical) is covered by ``pattern`` (a parsed service host)."""
    if pattern.startswith("*."):
        parent = pattern[2:]
        head, dot, rest = name.partition(".")
        return bool(head) and bool(dot) and rest == parent
    return name == pattern


def best_match(candidates: Iterable[tuple[str, T]], name: str) -> T | None:
    """Of ``(pattern, item)`` pairs, the item whose pattern covers ``name``: an
    exact pattern over a wildcard, and among equals the first."""
    canonical = canonical_name(name)
    if canonical is None:
        return None
    wildcard: T | None = None
    for pattern, item in candidates:
        if pattern == canonical:
            return item
        if wildcard is None and host_matches(pattern, canonical):
            wildcard = item
    return wildcard
