"""``dns_credentials`` at rest: sealed with the master key's ``dns-credentials``
purpose key, bound to their row, opened only to talk to the DNS server."""

from __future__ import annotations

import json

from kiln.crypto.sealing import seal, unseal

PURPOSE = "dns-credentials"


def _place(domain_id: int) -> str:
    return f"custom_domains:{domain_id}:dns_credentials"


def seal_credentials(key: bytes, domain_id: int, credentials: dict[str, str] | None) -> str | None:
    if not credentials:
        return None
    return seal(key, json.dumps(credentials).encode(), _place(domain_id))


def open_credentials(key: bytes, domain_id: int, sealed: str | None) -> dict[str, str]:
    if not sealed:
        return {}
    opened = json.loads(unseal(key, sealed, _place(domain_id)))
    return {str(name): str(value) for name, value in opened.items()}
