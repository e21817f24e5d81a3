"""What can go wrong with a domain's DNS or certificate; ``str()`` is fit for ``last_error``."""

from __future__ import annotations


class DomainError(Exception):
    """Base class: the message says what failed and, where it can, what to do."""


class DnsError(DomainError):
    """A DNS update was refused or could not be sent; a lookup failed."""


class UpdateRefused(DnsError):
    """The DNS server answered and refused an update: nothing of it was applied."""


class RecordsMissing(DomainError):
    """The records the domain needs are not (yet) served by its authoritative servers."""


class AcmeError(DomainError):
    """The ACME server refused an order, a challenge or a finalization, or was unreachable."""
