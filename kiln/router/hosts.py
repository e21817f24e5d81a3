"""Which share a request is for, from its Host header."""

from __future__ import annotations

import re

LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


def host_name(host_header: str) -> str:
    """The Host header's name: lowercase, without port or trailing dot (IPv6 literals as they are)."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host
    return host.rsplit(":", 1)[0].rstrip(".") if ":" in host else host.rstrip(".")


def share_id_of(host_header: str, share_domain: str) -> str | None:
    """``<share-id>.<domain>`` -> the share id; anything else (deeper names too) -> None."""
    domain = host_name(share_domain)
    name = host_name(host_header)
    suffix = "." + domain
    if not name.endswith(suffix):
        return None
    label = name[: -len(suffix)]
    return label if LABEL.fullmatch(label) else None
