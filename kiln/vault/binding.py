"""``Injection``: one header the egress proxy adds to one VM's requests to one service.

The service layer makes these from the store (a VM's vaults, their enabled
services whose credential exists) and hands them to the node, which passes
them to the egress daemon in the VM's feed file. The value travels sealed
(``kiln.crypto.sealing`` with the master key's ``VAULT_PURPOSE`` key, bound to
``credential_context``): only the daemon opens it, for the request it goes into.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kiln.vault.hosts import best_match

# The master key's purpose key credentials are sealed with (kiln.crypto.master_key.derive_key).
VAULT_PURPOSE = "vault-credentials"


def credential_context(credential_id: str) -> str:
    """What a credential's value is sealed for (its row: a token moved elsewhere does not open)."""
    return f"vault-credential:{credential_id}"


@dataclass(frozen=True)
class Injection:
    vault_id: str
    service_id: str
    host: str  # exact, or a one-level "*." wildcard (kiln.vault.hosts)
    header: str
    prefix: str  # sent before the value ("Bearer " for bearer services)
    credential_id: str
    credential_name: str
    sealed_value: str = field(repr=False)

    def to_json(self) -> dict[str, str]:
        return {
            "vault_id": self.vault_id,
            "service_id": self.service_id,
            "host": self.host,
            "header": self.header,
            "prefix": self.prefix,
            "credential_id": self.credential_id,
            "credential_name": self.credential_name,
            "sealed_value": self.sealed_value,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Injection:
        return cls(**{name: str(data[name]) for name in cls.__dataclass_fields__})


def injection_for(injections: tuple[Injection, ...], name: str) -> Injection | None:
    """The injection for a request to ``name``: an exact host over a wildcard,
    then the first in the VM's order (its ``vault_ids``, then each vault's services)."""
    return best_match(((injection.host, injection) for injection in injections), name)
