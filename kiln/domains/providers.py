"""DNS provider plugins: who publishes a custom domain's records.

A provider is named by ``dns_provider`` and takes ``dns_credentials``. Each one
is a ``ProviderKind`` in ``KINDS``: ``check`` says what is wrong with the
credentials (before anything is stored), ``make`` builds the ``DnsProvider``
that publishes and removes records. ``manual`` publishes nothing: the user
creates the records Kiln shows, and Kiln checks them by querying.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from kiln.domains import rfc2136
from kiln.domains.records import DnsRecord

Credentials = dict[str, str]
# (credential name or "" for the whole object, what is wrong with it)
CredentialProblem = tuple[str, str]


@dataclass(frozen=True)
class ProviderOptions:
    """The server's settings a provider may need."""

    allow_private: bool = False
    timeout_seconds: float = 10.0


class DnsProvider(Protocol):
    name: str
    # False: the user publishes the records (Kiln only checks them).
    publishes: bool

    async def publish(self, records: Sequence[DnsRecord]) -> None: ...

    async def remove(self, records: Sequence[DnsRecord]) -> None: ...

    def servers(self) -> list[tuple[str, int]]:
        """Servers known to hold the zone besides its NS records (a hidden primary)."""
        ...


@dataclass(frozen=True)
class ProviderKind:
    name: str
    check: Callable[[Credentials | None], list[CredentialProblem]]
    make: Callable[[Credentials, ProviderOptions], DnsProvider]
    summary: str


class ManualProvider:
    name = "manual"
    publishes = False

    async def publish(self, records: Sequence[DnsRecord]) -> None:
        return None

    async def remove(self, records: Sequence[DnsRecord]) -> None:
        return None

    def servers(self) -> list[tuple[str, int]]:
        return []


def _check_manual(credentials: Credentials | None) -> list[CredentialProblem]:
    if credentials:
        return [("", "the manual provider takes no dns_credentials (you create the records yourself)")]
    return []


KINDS: dict[str, ProviderKind] = {
    "rfc2136": ProviderKind(
        "rfc2136",
        rfc2136.check_credentials,
        lambda credentials, options: rfc2136.Rfc2136Provider(
            credentials, allow_private=options.allow_private, timeout=options.timeout_seconds
        ),
        "dynamic DNS update (RFC 2136) signed with a TSIG key",
    ),
    "manual": ProviderKind(
        "manual", _check_manual, lambda credentials, options: ManualProvider(), "you create the records"
    ),
}


def provider_for(name: str, credentials: Credentials | None, options: ProviderOptions) -> DnsProvider:
    return KINDS[name].make(credentials or {}, options)
